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


# A training process whose steps wait for a file to appear (the test decides when it may go on).
GATED_CHILD = """
import os, sys, time, pathlib
import train_stage1
real = train_stage1.run_pipeline
gate = pathlib.Path(os.environ["GATE_FILE"])
def gated(*args, **kwargs):
    while not gate.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
train_stage1.run_pipeline = gated
train_stage1.main(sys.argv[1:])
"""


def _spawn(argv, cwd, gate):
    import os
    import subprocess
    import sys

    from tests._recipe_helpers import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "GATE_FILE": str(gate), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", GATED_CHILD, *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_starts_on_one_run_dir_exactly_one_trains(recipe_env, tmp_path):
    """Both started at once with run.overwrite=true on an already used run dir: one takes the lock and
    trains, the other is refused naming the holder's pid and deletes nothing."""
    import time

    argv = _argv(recipe_env, tmp_path, "shared", max_steps=2, run__overwrite=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metrics.jsonl").write_text('{"step": 1}\n')  # a previous run: overwrite applies
    gate = tmp_path / "go"
    procs = [_spawn(argv, tmp_path, gate) for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while all(p.poll() is None for p in procs):  # the refused one exits on its own
            assert time.monotonic() < deadline, "neither process was refused"
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert winner.poll() is None  # still waiting at its first step, holding the lock
        err = loser.communicate()[1]
        assert loser.returncode != 0
        assert f"in use by another training run: pid {winner.pid} on this host" in err, err[-3000:]
        gate.touch()
        out, err = winner.communicate(timeout=300)
        assert winner.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [r["step"] for r in read_rows(tmp_path / "shared")] == [1, 2]
    assert not (tmp_path / "shared" / "run.lock").exists()  # released at the end


def test_a_lock_from_another_host_refuses_even_with_overwrite(recipe_env, tmp_path, monkeypatch):
    import json

    from training.faults import RunLockedError

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "run.lock").write_text(json.dumps({"pid": 7, "host": "node-17", "started": "x", "token": "t"}))
    with pytest.raises(RunLockedError, match="pid 7 on host node-17"):
        train_stage1.main(_argv(recipe_env, tmp_path, "busy", max_steps=1, run__overwrite=True))
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'  # nothing deleted


def test_a_failed_start_releases_the_lock(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        train_stage1.main(_argv(recipe_env, tmp_path, "fails", max_steps=1, training__resume_from="latest"))
    assert not (tmp_path / "fails" / "run.lock").exists()
