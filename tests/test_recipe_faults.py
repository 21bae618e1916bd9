"""Fault injection into the Stage-1 recipe on the tiny model (docs/RELIABILITY.md lists each fault and its test)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from pipeline.executor import PipelineExecutor
from tests._recipe_helpers import STAGE1_DEMO, crash_on_pipeline_call, read_rows, recipe_argv
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
    real = train_stage1.reduce_step

    def poison_after_step_3(cfg, s, done, **kwargs):
        if done == 3:  # optimizer step 3 has just updated the weights
            with torch.no_grad():
                s.vlm.get_output_embeddings().weight[0, 0] = float("nan")
        return real(cfg, s, done, **kwargs)

    monkeypatch.setattr(train_stage1, "reduce_step", poison_after_step_3)
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


# A training process whose n-th pipeline call (= optimizer step n without accumulation) touches
# <GATE_DIR>/at-<n> and waits for <GATE_DIR>/go-<n> or go-all: the test decides when it goes on.
GATED_CHILD = """
import os, sys, time, pathlib
import train_stage1
from pipeline.executor import PipelineExecutor
real = PipelineExecutor.run
gates = pathlib.Path(os.environ["GATE_DIR"])
calls = [0]
def gated(*args, **kwargs):
    calls[0] += 1
    (gates / f"at-{calls[0]}").touch()
    while not (gates / f"go-{calls[0]}").exists() and not (gates / "go-all").exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
PipelineExecutor.run = gated
train_stage1.main(sys.argv[1:])
"""


def _spawn(argv, cwd, gates):
    import os
    import subprocess
    import sys

    from tests._recipe_helpers import REPO

    gates.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GATE_DIR": str(gates), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", GATED_CHILD, *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, what, timeout=300):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def sigterm_in_step_2(proc, gates, timeout=300) -> str:
    """Send SIGTERM once a gated child (``go-1`` already there) waits in step 2, let it go on, return its stderr."""
    import signal

    try:
        _wait_for(lambda: (gates / "at-2").exists() or proc.poll() is not None, "step 2", timeout)
        proc.send_signal(signal.SIGTERM)
        (gates / "go-all").touch()
        return proc.communicate(timeout=timeout)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_concurrent_starts_on_one_run_dir_exactly_one_trains(recipe_env, tmp_path):
    """Both started at once with run.overwrite=true on an already used run dir: one takes the lock and
    trains, the other is refused naming the holder's pid and deletes nothing."""
    argv = _argv(recipe_env, tmp_path, "shared", max_steps=2, run__overwrite=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "metrics.jsonl").write_text('{"step": 1}\n')  # a previous run: overwrite applies
    (tmp_path / "shared" / "config.resolved.yaml").write_text("run: {}\n")  # (a run of this project)
    gates = tmp_path / "gates"
    procs = [_spawn(argv, tmp_path, gates) for _ in range(2)]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs), "a refusal")  # the refused one exits
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert winner.poll() is None  # still waiting at its first step, holding the lock
        err = loser.communicate()[1]
        assert loser.returncode != 0
        assert f"in use by another training run: pid {winner.pid} on this host" in err, err[-3000:]
        (gates / "go-all").touch()
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


def test_sigterm_mid_run_saves_stops_and_resumes_like_the_uninterrupted_run(recipe_env, tmp_path, monkeypatch):
    """SIGTERM while step 2 of 4 runs (save_every 0, the default): the process finishes step 2,
    writes checkpoint-2, exits 143 with the resume command; `latest` then reproduces the
    uninterrupted run (rtol 1e-5)."""
    import signal

    from training.checkpoint import verify_checkpoint

    monkeypatch.chdir(tmp_path)
    argv = _argv(recipe_env, tmp_path, "term", max_steps=4, training__warmup_steps=1)
    gates = tmp_path / "gates"
    gates.mkdir()
    (gates / "go-1").touch()
    proc = _spawn(argv, tmp_path, gates)
    err = sigterm_in_step_2(proc, gates)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM after optimizer step 2 of 4: checkpoint-2 saved" in err
    assert "--set training.resume_from=latest" in err
    run_dir = tmp_path / "term"
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2]
    verify_checkpoint(run_dir / "checkpoint-2")
    assert not (run_dir / "run.lock").exists()

    train_stage1.main([*argv, "--set", "training.resume_from=latest"])
    train_stage1.main(_argv(recipe_env, tmp_path, "full", max_steps=4, training__warmup_steps=1))
    resumed, full = read_rows(run_dir), read_rows(tmp_path / "full")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        assert a["train/tokens_total"] == b["train/tokens_total"]
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-12)
        for key in (k for k in a if k.startswith("loss/")):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_save_on_interrupt_false_keeps_the_default_signal_behaviour(recipe_env, tmp_path, monkeypatch):
    import os
    import signal

    monkeypatch.chdir(tmp_path)
    real = PipelineExecutor.run

    def ctrl_c(self, ctx):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, ctx)

    monkeypatch.setattr(PipelineExecutor, "run", ctrl_c)
    # Python's own Ctrl-C handler for the test: a shell starts a background job (`nohup ... &`, some CI
    # runners) with SIGINT ignored, and the process inherits that
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stage1.main(_argv(recipe_env, tmp_path, "plain", max_steps=3, training__save_on_interrupt=False))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list_checkpoints(tmp_path / "plain") == []
    assert not (tmp_path / "plain" / "run.lock").exists()


def test_the_used_run_dir_refusal_suggests_a_resume_only_when_one_can_work(recipe_env, tmp_path, monkeypatch):
    """save_every 0 and a crash in step 2: no checkpoint, so the refusal must not suggest
    resume_from=latest (which would fail); once a checkpoint exists it does."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(recipe_env, tmp_path, "crashed", max_steps=2)
    with monkeypatch.context() as mp:
        crash_on_pipeline_call(mp, 2, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_stage1.main(argv)
    with pytest.raises(FileExistsError) as info:
        train_stage1.main(argv)
    assert "resume_from" not in str(info.value) and "no checkpoint to resume from" in str(info.value)
    assert "run.overwrite=true" in str(info.value)
    (tmp_path / "crashed" / "checkpoint-1").mkdir()
    (tmp_path / "crashed" / "checkpoint-1" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="resume it with --set training.resume_from=latest"):
        train_stage1.main(argv)


def test_disk_full_at_the_final_save_fails_clearly_and_cleans_up(recipe_env, tmp_path, monkeypatch):
    """ENOSPC while the recipe writes optimizer.pt: one CheckpointError naming the run dir, no
    checkpoint-2.tmp left, checkpoint-1 intact, the lock released."""
    import errno

    import training.checkpoint as ckpt_mod
    from training.checkpoint import CheckpointError, verify_checkpoint

    monkeypatch.chdir(tmp_path)
    real_save = torch.save
    saves = {"n": 0}

    def full_disk_at_second_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk_at_second_save)
    with pytest.raises(CheckpointError, match=f"no space left on the device of {tmp_path / 'full'}.*resume_from=latest"):
        train_stage1.main(_argv(recipe_env, tmp_path, "full", max_steps=2, training__save_every=1))
    run_dir = tmp_path / "full"
    assert not (run_dir / "checkpoint-2.tmp").exists() and not (run_dir / "checkpoint-2").exists()
    verify_checkpoint(run_dir / "checkpoint-1")
    assert not (run_dir / "run.lock").exists()
