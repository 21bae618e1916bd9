"""Signals in the middle of an optimizer step (docs/RELIABILITY.md): the partial gradient
accumulation is dropped, the last completed optimizer step is saved at the next micro-step, and a
resume from that checkpoint equals the uninterrupted run bit for bit. Stage-1 on the tiny model,
2 micro-steps per optimizer step, in-process (the 2-rank `accelerate launch` version is in
tests/test_recipe_slow.py)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
from pipeline.executor import PipelineExecutor
from tests._recipe_helpers import STAGE1_DEMO, read_rows, recipe_argv
from training.checkpoint import list_checkpoints, verify_checkpoint
from training.faults import TrainingInterrupted

ACCUM = 2  # micro-steps per optimizer step: pipeline call 3 is the first micro-step of step 2


def _argv(env, out, name, **sets):
    base = {"training__warmup_steps": 1, "training__eval_every": 0, "training__save_every": 0,
            "training__gradient_accumulation_steps": ACCUM, "training__batch_size": 1}
    return recipe_argv(env, STAGE1_DEMO, out, name=name, max_steps=3, **{**base, **sets})


def _signal_on_call(monkeypatch, n_call: int, signum: int) -> None:
    """This process receives ``signum`` inside pipeline call ``n_call`` (a micro-step's forward)."""
    real, calls = PipelineExecutor.run, {"n": 0}

    def signalled(self, ctx):
        calls["n"] += 1
        if calls["n"] == n_call:
            os.kill(os.getpid(), signum)
        return real(self, ctx)

    monkeypatch.setattr(PipelineExecutor, "run", signalled)


def same_checkpoint(a, b) -> None:
    """Two checkpoints hold the same training state (every rank's RNG file too), bit for bit."""
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    rngs = sorted(p.name for p in a.glob("rng_*.pt"))
    assert rngs and rngs == sorted(p.name for p in b.glob("rng_*.pt"))
    for name in ("optimizer.pt", "scheduler.pt", *rngs):
        sa, sb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert repr(sa) == repr(sb), name  # nested dicts of tensors: equal values print equal
    ta, tb = (json.loads((c / "trainer_state.json").read_text()) for c in (a, b))
    assert (ta["step"], ta["data_state"]) == (tb["step"], tb["data_state"])


@pytest.fixture(scope="module")
def full_run(recipe_env, tmp_path_factory):
    """The uninterrupted 3-step run, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("interrupts_full")
    cwd = os.getcwd()
    os.chdir(out)
    try:
        train_stage1.main(_argv(recipe_env, out, "full", training__save_every=1))
    finally:
        os.chdir(cwd)
    return out / "full"


def test_sigterm_mid_step_saves_the_last_completed_step_and_the_resume_is_bit_exact(
        recipe_env, full_run, tmp_path, monkeypatch, capsys):
    """SIGTERM in the first micro-step of step 2: the second micro-step never runs, checkpoint-1 (the
    last completed step) is written with step 1's data position and RNG, the run exits 143; resuming
    replays step 2 whole and ends where the uninterrupted run ends, bit for bit."""
    monkeypatch.chdir(tmp_path)
    argv = _argv(recipe_env, tmp_path, "term")
    with monkeypatch.context() as mp:
        _signal_on_call(mp, ACCUM + 1, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted) as info:
            train_stage1.main(argv)
    assert info.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "received SIGTERM: dropping the current optimizer step's partial accumulation" in err
    assert ("stopped by SIGTERM during optimizer step 2 of 3 (its partial gradient accumulation dropped; a resume "
            "replays it): checkpoint-1 of the last completed optimizer step saved in") in err
    run_dir = tmp_path / "term"
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]
    assert [r["step"] for r in read_rows(run_dir)] == [1]
    verify_checkpoint(run_dir / "checkpoint-1")
    same_checkpoint(run_dir / "checkpoint-1", full_run / "checkpoint-1")
    assert not (run_dir / "run.lock").exists()

    train_stage1.main([*argv, "--set", "training.resume_from=latest"])
    same_checkpoint(run_dir / "checkpoint-3", full_run / "checkpoint-3")
    untimed = [[{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_rows(d)]
               for d in (run_dir, full_run)]
    assert untimed[0] == untimed[1]  # every loss and counter of steps 1-3, exactly


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_sigusr1_stop_mid_step_like_sigterm(recipe_env, full_run, tmp_path, monkeypatch, signum):
    """Ctrl-C, and SIGUSR1 with the default training.on_sigusr1=stop: the same checkpoint-1 as the
    uninterrupted run's, exit 128 + signal."""
    monkeypatch.chdir(tmp_path)
    # Python's own Ctrl-C handler underneath (a background shell may start pytest with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as mp:
            _signal_on_call(mp, ACCUM + 1, signum)
            with pytest.raises(TrainingInterrupted) as info:
                train_stage1.main(_argv(recipe_env, tmp_path, "sig"))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.code == 128 + signum
    assert f"stopped by {signal.Signals(signum).name} during optimizer step 2 of 3" in info.value.message
    assert [s for s, _ in list_checkpoints(tmp_path / "sig")] == [1]
    same_checkpoint(tmp_path / "sig" / "checkpoint-1", full_run / "checkpoint-1")


def test_sigusr1_save_and_continue_checkpoints_mid_step_and_trains_on_unchanged(
        recipe_env, full_run, tmp_path, monkeypatch, capsys):
    """training.on_sigusr1=save_and_continue, SIGUSR1 in step 2: checkpoint-1 is written before step 2's
    second micro-step, equal to the uninterrupted run's, and the run goes on to the same end."""
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as mp:
        _signal_on_call(mp, ACCUM + 1, signal.SIGUSR1)
        train_stage1.main(_argv(recipe_env, tmp_path, "usr1", training__on_sigusr1="save_and_continue"))
    assert "checkpoint-1 of the last completed optimizer step saved on SIGUSR1; training goes on" in capsys.readouterr().err
    run_dir = tmp_path / "usr1"
    assert [s for s, _ in list_checkpoints(run_dir)] == [1, 3]
    same_checkpoint(run_dir / "checkpoint-1", full_run / "checkpoint-1")
    same_checkpoint(run_dir / "checkpoint-3", full_run / "checkpoint-3")


def test_a_signal_before_the_first_step_completes_saves_nothing_and_says_so(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as mp:
        _signal_on_call(mp, 1, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="during optimizer step 1 of 3, before any optimizer step "
                                                      "completed: nothing to save.*run.overwrite=true"):
            train_stage1.main(_argv(recipe_env, tmp_path, "early"))
    assert list_checkpoints(tmp_path / "early") == []
    assert not (tmp_path / "early" / "run.lock").exists()


def test_stage2_sigterm_mid_step_saves_the_router_state_of_the_last_completed_step(recipe_env, tmp_path, monkeypatch):
    """Stage-2 Two-Channel, b_ratio 0.5 (A, B, A), 2 micro-steps: SIGTERM in the Channel-B step 2's first
    micro-step saves checkpoint-1 with the router as it was after step 1; the resume replays step 2 as a
    Channel-B step and ends where the uninterrupted run ends, bit for bit."""
    import train_stage2
    from tests._recipe_helpers import STAGE2_DEMO

    monkeypatch.chdir(tmp_path)

    def argv(name, **sets):
        return recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name=name, max_steps=3, stage2_ab__schedule__b_ratio=0.5,
                           training__warmup_steps=1, training__eval_every=0, training__gradient_accumulation_steps=ACCUM,
                           training__batch_size=1, **sets)

    train_stage2.main(argv("full", training__save_every=1))
    with monkeypatch.context() as mp:
        _signal_on_call(mp, ACCUM + 1, signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="during optimizer step 2 of 3"):
            train_stage2.main(argv("term"))
    state = json.loads((tmp_path / "term" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["router_state"]["next_step"] == 1 and state["router_state"]["count_b"] == 0
    same_checkpoint(tmp_path / "term" / "checkpoint-1", tmp_path / "full" / "checkpoint-1")
    train_stage2.main(argv("term", training__resume_from="latest"))
    same_checkpoint(tmp_path / "term" / "checkpoint-3", tmp_path / "full" / "checkpoint-3")
    rows = [[r["stage2/channel_b_count"] for r in read_rows(tmp_path / d)] for d in ("term", "full")]
    assert rows[0] == rows[1] == [0.0, 1.0, 0.0]

    # SIGTERM while step 2's rollouts are generated: the generate call ends after one token, not at
    # max_new_tokens, and the run stops with the same checkpoint-1
    from rollout.backends import HFGenerationBackend

    real, decoded = HFGenerationBackend._generate_batch, []

    def signalled(self, prompts):
        if not decoded:
            os.kill(os.getpid(), signal.SIGTERM)
        out = real(self, prompts)
        decoded.append(self._last_steps)
        return out

    with monkeypatch.context() as mp:
        mp.setattr(HFGenerationBackend, "_generate_batch", signalled)
        with pytest.raises(TrainingInterrupted, match="during optimizer step 2 of 3"):
            train_stage2.main(argv("gen"))
    assert decoded == [1]  # the first batch stopped after one token (else 8), the others skipped
    same_checkpoint(tmp_path / "gen" / "checkpoint-1", tmp_path / "full" / "checkpoint-1")
