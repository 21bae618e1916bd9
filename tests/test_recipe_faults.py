"""Fault injection into the Stage-1 recipe on the tiny model (docs/RELIABILITY.md lists each fault and its test)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from tests._recipe_helpers import STAGE1_DEMO, read_rows, recipe_argv
from training.checkpoint import list_checkpoints
from training.faults import NONFINITE_METRIC, NonFiniteError


def _argv(env, tmp_path, name, **sets):
    base = {"training__warmup_steps": 0, "training__eval_every": 0, "training__save_every": 0}
    return recipe_argv(env, STAGE1_DEMO, tmp_path, name=name, **{**base, **sets})


def _all_finite(model_dir) -> bool:
    tensors = load_file(str(model_dir / "model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_nan_run_skips_steps_stops_and_keeps_a_finite_newest_checkpoint(recipe_env, tmp_path, monkeypatch):
    """lr=1e10: step 1 is finite and blows the weights up, every later loss is NaN. Those steps are
    skipped and counted, 3 in a row stop the run, and with save_total_limit=2 the checkpoints left
    are finite."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(recipe_env, tmp_path, "nan", max_steps=10, training__lr=1e10, training__save_every=1,
                 training__save_total_limit=2, training__max_consecutive_nonfinite=3)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row \(steps 2-4\).*training.lr \(now 1e\+10\)"):
        train_stage1.main(argv)
    rows = read_rows(tmp_path / "nan")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r[NONFINITE_METRIC] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    ckpts = list_checkpoints(tmp_path / "nan")
    assert [s for s, _ in ckpts] == [3, 4]
    for _, path in ckpts:
        assert _all_finite(path / "model")


def test_nonfinite_weights_are_never_checkpointed(recipe_env, tmp_path, monkeypatch):
    """A NaN written into the weights after step 3's update stops the run at
    the save of step 3 instead of writing checkpoint-3; checkpoint-2 stays the newest."""
    monkeypatch.chdir(tmp_path)
    real = train_stage1.finish_step

    def poison_after_step_3(cfg, run, s, step, **kwargs):
        if step == 2:  # 0-based: optimizer step 3 has just updated the weights
            with torch.no_grad():
                s.vlm.get_output_embeddings().weight[0, 0] = float("nan")
        return real(cfg, run, s, step, **kwargs)

    monkeypatch.setattr(train_stage1, "finish_step", poison_after_step_3)
    argv = _argv(recipe_env, tmp_path, "poison", max_steps=4, training__save_every=1)
    with pytest.raises(NonFiniteError, match="checkpoint-3 was not written.*newest finite checkpoint: .*checkpoint-2"):
        train_stage1.main(argv)
    assert [s for s, _ in list_checkpoints(tmp_path / "poison")] == [1, 2]
    assert _all_finite(tmp_path / "poison" / "checkpoint-2" / "model")


def test_corrupt_newest_checkpoint_latest_resumes_from_the_previous(recipe_env, tmp_path, monkeypatch, capsys):
    """4 KB of garbage in checkpoint-3's weights: naming it fails with the file named; `latest`
    warns, resumes from checkpoint-2 and writes a good checkpoint-3. A torn metrics.jsonl line after
    the resume point does not block the resume."""
    from training.checkpoint import CheckpointError, verify_checkpoint

    monkeypatch.chdir(tmp_path)
    argv = _argv(recipe_env, tmp_path, "corrupt", max_steps=3, training__save_every=1)
    train_stage1.main(argv)
    weights = tmp_path / "corrupt" / "checkpoint-3" / "model" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size // 2)
        fh.write(b"\x7f" * 4096)
    with pytest.raises(CheckpointError, match=r"checkpoint-3: model/model.safetensors does not match its SHA-256"):
        train_stage1.main([*argv, "--set", f"training.resume_from={weights.parents[1]}"])
    with open(tmp_path / "corrupt" / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 4, "loss/to')  # and a torn metrics line (killed mid-write) after the resume point
    capsys.readouterr()
    train_stage1.main([*argv, "--set", "training.resume_from=latest"])
    assert "WARNING coordexp: resume_from=latest: skipping checkpoint-3" in capsys.readouterr().err
    assert [r["step"] for r in read_rows(tmp_path / "corrupt")] == [1, 2, 3]
    verify_checkpoint(tmp_path / "corrupt" / "checkpoint-3")
