"""Unit tests of training/faults.py: the non-finite guard and the finite-weights check."""

from __future__ import annotations

import os

import pytest
import torch

from training.faults import InterruptFlag, NonFiniteError, NonFiniteGuard, any_rank, weights_finite


def test_guard_skips_counts_and_stops_after_a_streak():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.observe_loss(torch.tensor(1.0))
    assert guard.step_is_finite(torch.tensor(0.5)) == (True, ())
    assert guard.record(1) == 0.0
    # a NaN loss on any micro-step of the window makes the step non-finite, and the flag resets
    guard.observe_loss(torch.tensor(float("nan")))
    guard.observe_loss(torch.tensor(1.0))
    assert guard.step_is_finite(1.0)[0] is False
    assert guard.record(2) == 1.0
    guard.check_streak(2, lambda: None, "Lower training.lr")  # 1 < 2: goes on
    assert guard.step_is_finite(float("inf"))[0] is False  # grad norm alone
    assert guard.record(3) == 1.0
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(steps 2-3\).*no checkpoint"):
        guard.check_streak(3, lambda: None, "Lower training.lr")
    # a finite step ends the streak; the total stays
    assert guard.step_is_finite(1.0)[0] is True and guard.record(4) == 0.0
    assert (guard.streak, guard.skipped_total) == (0, 2)
    guard.check_streak(4, lambda: None, "Lower training.lr")


def test_other_flags_ride_on_the_same_agreement():
    guard = NonFiniteGuard(max_consecutive=10)
    assert guard.step_is_finite(1.0, other_flags=(True, False)) == (True, (True, False))
    assert any_rank(None, False, True) == (False, True)


def test_weights_finite():
    params = [torch.zeros(3, 4), torch.full((2,), 1e10)]
    assert weights_finite(None, params)
    params[0][1, 2] = float("inf")
    assert not weights_finite(None, params)
    params[0][1, 2] = float("nan")
    assert not weights_finite(None, params)
    assert weights_finite(None, [])


# ------------------------------------------------------------------ run lock


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir, pid, host):
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps({"pid": pid, "host": host, "started": "then", "token": "x"}))


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    import json
    import socket
    import subprocess
    import sys

    from training.faults import RunLockedError, acquire_run_lock
    from training.setup import setup_logging

    setup_logging()
    run_dir = tmp_path / "run"
    lock = acquire_run_lock(run_dir)
    held = json.loads((run_dir / "run.lock").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=f"in use by another training run: pid {os.getpid()} on this host"):
        acquire_run_lock(run_dir)
    lock.release()
    assert not (run_dir / "run.lock").exists()

    # a live process on this host
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run_dir, sleeper.pid, socket.gethostname())
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on this host"):
            acquire_run_lock(run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    # now dead: stale, taken over with a warning
    capsys.readouterr()
    lock = acquire_run_lock(run_dir)
    assert f"took over a stale lock of pid {sleeper.pid}" in capsys.readouterr().err
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    # a release never removes someone else's lock
    _write_lock(run_dir, _dead_pid(), socket.gethostname())
    lock.release()
    assert (run_dir / "run.lock").exists()

    # another host: its pid cannot be checked from here; refused, with how to clear it if it is gone
    _write_lock(run_dir, 4242, "elsewhere")
    with pytest.raises(RunLockedError, match=r"pid 4242 on host elsewhere.*delete .*run.lock"):
        acquire_run_lock(run_dir)


# ------------------------------------------------------------ 2-rank gloo


def _gloo_worker(rank: int, store: str, out_dir: str, scenario: str) -> None:
    """One rank of a 2-process CPU DDP group built by ``make_accelerator`` (the recipes' path)."""
    import json
    import signal
    import time

    from accelerate.utils import InitProcessGroupKwargs

    from training.setup import make_accelerator

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1")
    # A FileStore rendezvous (no TCP port to race for); make_accelerator adds the collective timeout.
    acc = make_accelerator(cpu=True, collective_timeout_s=3 if scenario == "timeout" else 60,
                           kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", init_method=store)])
    result: dict = {"world": acc.num_processes}
    if scenario == "agree":
        # rank 1 alone gets SIGTERM during step 2; rank 0 alone has a NaN loss in step 4
        flag, guard = InterruptFlag(True), NonFiniteGuard(max_consecutive=10)
        steps = []
        try:
            for step in range(6):
                if rank == 1 and step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                guard.observe_loss(torch.tensor(float("nan") if (rank == 0 and step == 4) else 1.0))
                finite, (stop,) = guard.step_is_finite(1.0, other_flags=(flag.requested,), accelerator=acc)
                flag.agreed |= stop
                steps.append({"finite": finite, "stop": flag.agreed})
        finally:
            flag.close()
        result.update(steps=steps, signum=flag.signum)
    else:  # rank 1 freezes; rank 0's next collective must fail after the timeout, not hang
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        start = time.monotonic()
        try:
            any_rank(acc, True)
            result["error"] = None
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["waited_s"] = time.monotonic() - start
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _run_gloo(tmp_path, scenario, ranks_to_wait):
    import json
    import time

    import torch.multiprocessing as mp

    store = f"file://{tmp_path / 'pg_store'}"
    ctx = mp.spawn(_gloo_worker, args=(store, str(tmp_path), scenario), nprocs=2, join=False)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.json").exists() for r in ranks_to_wait):
            assert time.monotonic() < deadline, f"{scenario}: ranks {ranks_to_wait} did not report"
            time.sleep(0.1)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in ranks_to_wait]


def test_two_gloo_ranks_agree_on_skipping_and_stopping(tmp_path):
    """A NaN loss on one rank skips the step on both; a SIGTERM on one rank stops both after the same step."""
    import signal

    r0, r1 = _run_gloo(tmp_path, "agree", (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["steps"] == r1["steps"]
    assert [s["finite"] for s in r0["steps"]] == [True, True, True, True, False, True]
    assert [s["stop"] for s in r0["steps"]] == [False, False, True, True, True, True]
    assert (r0["signum"], r1["signum"]) == (None, signal.SIGTERM)


def test_a_frozen_rank_becomes_an_error_after_the_collective_timeout(tmp_path):
    """training.collective_timeout_s=3 and rank 1 SIGSTOPped: rank 0's collective raises instead of waiting forever."""
    (r0,) = _run_gloo(tmp_path, "timeout", (0,))
    assert r0["error"] is not None, "the collective returned although rank 1 was frozen"
    assert r0["waited_s"] >= 2.5
