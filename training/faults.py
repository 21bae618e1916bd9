"""Fault handling of the training loop (``docs/RELIABILITY.md`` lists every fault and its test).

- :class:`NonFiniteGuard`: a non-finite loss or gradient norm skips the optimizer step (counted as
  ``train/nonfinite_skipped_total``); ``training.max_consecutive_nonfinite`` skipped steps in a row
  stop the run with :class:`NonFiniteError`.
- :func:`weights_finite`: checked before every checkpoint save, so a checkpoint is never written
  from non-finite weights.
- :func:`acquire_run_lock`: one training run per run dir (``run.lock``: pid + host); a second run
  is refused naming the holder, a stale lock (dead pid on this host) is taken over with a warning.
- :class:`InterruptFlag`: SIGTERM / SIGINT / SIGUSR1 only set a flag; at the next micro-step every rank
  agrees, drops the partial accumulation, saves the last completed optimizer step and stops with
  :class:`TrainingInterrupted` (or, SIGUSR1 with ``training.on_sigusr1: save_and_continue``, trains on).
- :func:`any_rank`: the one cross-rank agreement on per-rank flags (every rank takes the same
  decision: skip, stop, save); :func:`main_process_decides`: a decision taken once on the main
  process (resume checkpoint, run lock) that every rank follows, errors included.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.vocab import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)

NONFINITE_METRIC = "train/nonfinite_skipped_total"


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def any_rank(accelerator: Any, *flags: bool) -> tuple[bool, ...]:
    """Each flag is true on every rank if it is true on any rank; one collective for all flags."""
    if accelerator is None or accelerator.num_processes == 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], device=accelerator.device)
    return tuple(bool(v > 0) for v in accelerator.reduce(t, reduction="sum").tolist())


def weights_finite(accelerator: Any, params: Iterable[torch.Tensor]) -> bool:
    """True when every parameter element is finite, on every rank.

    One fp32-accumulated sum per tensor (no bool copy of a vocabulary-sized embedding); a NaN or
    Inf anywhere makes its sum non-finite. Only a weight tensor whose sum exceeds ~3e38 would be
    reported non-finite without holding a non-finite element.
    """
    sums = [p.detach().sum(dtype=torch.float32) for p in params]
    local = bool(torch.stack(sums).isfinite().all()) if sums else True
    return not any_rank(accelerator, not local)[0]


def main_process_decides(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only and hand its result, or its exception, to every rank.

    For decisions that read or write the shared run dir once (resume checkpoint, run lock): the
    other ranks never hang in a barrier when the main process fails, they raise the same error.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", exc)
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


@dataclass
class NonFiniteGuard:
    """Skip optimizer steps whose loss (any micro-step, any rank) or gradient norm is not finite.

    ``observe_loss`` after each backward; ``step_is_finite`` once per optimizer step, before the
    optimizer steps (all ranks agree); ``record`` after the step's metrics are logged.
    """

    max_consecutive: int  # training.max_consecutive_nonfinite
    skipped_total: int = 0
    streak: int = 0
    streak_start: int | None = None  # first optimizer step (1-based) of the current streak
    _loss_bad: bool = False
    _skipped: bool = False
    _main: bool = True

    def observe_loss(self, loss: torch.Tensor) -> None:
        self._loss_bad |= not bool(torch.isfinite(loss.detach()).all())

    def step_is_finite(self, grad_norm: torch.Tensor | float, *, other_flags: tuple[bool, ...] = (),
                       accelerator: Any = None) -> tuple[bool, tuple[bool, ...]]:
        """Agree over ranks whether this step is finite; ``other_flags`` ride on the same collective.

        The gradient norm is the global one (identical on every rank after the all-reduce); the loss
        is per rank. Returns (finite, other_flags agreed).
        """
        bad = self._loss_bad or not math.isfinite(float(grad_norm))
        self._loss_bad = False
        bad, *others = any_rank(accelerator, bad, *other_flags)
        self._skipped = bad
        self._main = accelerator is None or accelerator.is_main_process
        return not bad, tuple(others)

    def record(self, done: int) -> float:
        """After optimizer step ``done`` (1-based): update the counts; return the step's metric value."""
        if not self._skipped:
            self.streak, self.streak_start = 0, None
            return 0.0
        self._skipped = False
        self.skipped_total += 1
        self.streak += 1
        if self.streak_start is None:
            self.streak_start = done
        if self._main:  # every rank took the same decision; say it once
            logger.warning("step %d: non-finite loss or gradient norm, optimizer step skipped (%d in a row, %d in total)",
                           done, self.streak, self.skipped_total)
        return 1.0

    def check_streak(self, done: int, newest_checkpoint: Callable[[], Any], fix: str) -> None:
        """Raise :class:`NonFiniteError` once ``max_consecutive`` steps in a row were skipped."""
        if self.streak < self.max_consecutive:
            return
        newest_checkpoint = newest_checkpoint()
        where = (f"the newest checkpoint, {newest_checkpoint}, holds finite weights" if newest_checkpoint
                 else "no checkpoint was written")
        raise NonFiniteError(
            f"training stopped at step {done}: {self.streak} optimizer steps in a row (steps {self.streak_start}-{done}) "
            f"had a non-finite loss or gradient norm and were skipped ({self.skipped_total} skipped in total); "
            f"{where}. {fix}, or allow longer streaks with training.max_consecutive_nonfinite"
        )


# ------------------------------------------------------------------ run lock

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live training run holds the run dir."""


@dataclass
class RunLock:
    """The lock this process holds on a run dir; :meth:`release` removes it (only if still ours)."""

    path: Path
    token: str

    def release(self) -> None:
        if _read_lock(self.path).get("token") == self.token:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _slurm_run() -> dict[str, Any]:
    """The SLURM job and restart count of this process (requeued jobs keep their id), if under SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)} if job else {}


def _earlier_run_of_this_job(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """The lock was taken by an earlier run of this same requeued SLURM job (on any host): it is over."""
    try:
        return (bool(me.get("slurm_job")) and holder.get("slurm_job") == me["slurm_job"]
                and int(holder.get("slurm_restart", 0)) < int(me["slurm_restart"]))
    except (TypeError, ValueError):
        return False


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Create ``<run_dir>/run.lock`` (pid, host, start time) atomically, or raise :class:`RunLockedError`.

    A lock whose pid is dead on this host is stale (the run was killed): it is taken over with a
    warning; so is a lock of an earlier run of the same requeued SLURM job (same ``SLURM_JOB_ID``, a
    lower ``SLURM_RESTART_COUNT``, any host: a job killed at its time limit and restarted on other
    nodes). A live holder, or one on another host (its pid cannot be checked from here), refuses the
    run whatever ``run.overwrite`` says.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "token": uuid.uuid4().hex,
          **_slurm_run()}
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is None:
            holder = _read_lock(path)
            if not holder:  # being written by its creator right now, or garbage: look again
                time.sleep(0.05)
                if not _read_lock(path) and path.exists():
                    holder = {"pid": -1, "host": host}  # unreadable twice: treat as stale
                else:
                    continue
            pid, holder_host = int(holder.get("pid", -1)), str(holder.get("host", "?"))
            earlier_run_of_this_job = _earlier_run_of_this_job(holder, me)
            if holder_host != host and not earlier_run_of_this_job:
                raise RunLockedError(
                    f"{run_dir} is in use by another training run: pid {pid} on host {holder_host} since "
                    f"{holder.get('started', '?')} (lock file {path}). Pick another run.name, or wait for it to end; "
                    f"run.overwrite does not replace a running run. If that run is gone (host {holder_host} went down), "
                    f"delete {path}."
                )
            if pid > 0 and holder_host == host and not earlier_run_of_this_job and _pid_alive(pid):
                raise RunLockedError(
                    f"{run_dir} is in use by another training run: pid {pid} on this host ({host}) since "
                    f"{holder.get('started', '?')} (lock file {path}). Pick another run.name, or wait for it to end "
                    f"(`kill -TERM {pid}` stops it at its next micro-step, with a checkpoint unless it runs with "
                    "training.save_on_interrupt=false); run.overwrite does not replace a running run."
                )
            # Stale: move it aside under a unique name; if what we moved is not the lock we judged (a
            # concurrent taker replaced it meanwhile), put it back and look again.
            aside = path.with_name(f"{LOCK_NAME}.stale-{me['token']}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if _read_lock(aside) != holder:
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            if earlier_run_of_this_job:
                logger.warning("%s: took over the lock of pid %d on host %s, an earlier run of this requeued SLURM "
                               "job %s (SLURM ends a run before it restarts the job)", path, pid, holder_host,
                               me["slurm_job"])
            else:
                logger.warning("%s: took over a stale lock of pid %d on this host (that process is gone; the run "
                               "was killed)", path, pid)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        return RunLock(path, me["token"])
    raise RunLockedError(f"{path}: could not take the lock (another process keeps replacing it)")


# ---------------------------------------------------------------- interrupts


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal after saving; exits with ``128 + signal number`` (143, 130, 138)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum  # the exit status; the message is logged before raising
        self.message = message


SAVE_AND_CONTINUE = "save_and_continue"  # training.on_sigusr1


class InterruptFlag:
    """SIGTERM (what SLURM / Kubernetes send before preemption), SIGINT and SIGUSR1 only set flags.

    Installed when ``training.save_on_interrupt`` is true; :meth:`close` restores the previous
    handlers. A stop signal sets :attr:`signum`; SIGUSR1 with ``training.on_sigusr1:
    save_and_continue`` sets :attr:`save_requested` instead. The training loop agrees on both over
    the ranks at every micro-step (:meth:`agree`): a stop drops the step's partial accumulation,
    saves the last completed optimizer step and stops; a save writes that checkpoint and goes on.
    A second SIGINT stops at once (``KeyboardInterrupt``), without a checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, enabled: bool, *, on_sigusr1: str = "stop"):
        self.signum: int | None = None  # the stop signal this rank received
        self.save_requested = False  # SIGUSR1 in save-and-continue mode, not yet agreed on
        self.agreed = False  # some rank received a stop signal: every rank stops
        self.save_agreed = False  # some rank asked for a save-and-continue: every rank saves
        self.sigusr1_continues = on_sigusr1 == SAVE_AND_CONTINUE
        self._previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and _peer_reported(fresh=True):  # the launcher stopping us after a user error
            raise PeerStopped(2)
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1 and self.sigusr1_continues:
            self.save_requested = True
            logger.warning("received %s: saving a checkpoint of the last completed optimizer step at the next "
                           "micro-step, then training on", name)
        elif self.signum is None:
            self.signum = signum
            logger.warning("received %s: dropping the current optimizer step's partial accumulation at the next "
                           "micro-step (it is replayed on resume), saving the last completed optimizer step and "
                           "stopping (a second Ctrl-C stops at once, without a checkpoint)", name)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def flags(self) -> tuple[bool, bool]:
        """This rank's (stop, save) requests, for a cross-rank agreement; the save request is taken."""
        save, self.save_requested = self.save_requested, False
        return self.requested, save

    def agree(self, accelerator: Any = None, agreed: tuple[bool, ...] | None = None) -> tuple[bool, bool]:
        """Record the ranks' agreement on :meth:`flags` (``agreed``, when it rode on another collective,
        else one :func:`any_rank` here); returns (stop, save) as every rank sees them now."""
        if agreed is None:
            agreed = any_rank(accelerator, *self.flags())
        stop, save = agreed
        self.agreed |= stop
        self.save_agreed |= save
        return self.agreed, self.save_agreed

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ------------------------------------------------- user errors under a launcher

_USER_ERROR_KEY = "coordexp/user_error"
_ACK_WAIT_S = 2.0  # how long the reporting rank waits for the other ranks to stop before it prints


class PeerStopped(SystemExit):
    """This rank stops (exit 2, nothing printed) because another rank reported a user error."""


def _shared_store(fresh: bool = False, _cache: list = []) -> Any:  # noqa: B006 - the one cached client
    """A key-value store every rank of this launch reaches, or None (one process, or none reachable):
    the launcher's own store (torch elastic hosts one for its workers: ``TORCHELASTIC_USE_AGENT_STORE``,
    there before any process group), else the process group's. ``fresh``: a new client (a signal
    handler must not reuse a socket the interrupted code may be using)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if _cache and not fresh:
        return _cache[0]
    try:
        import datetime

        import torch.distributed as dist

        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=3 if fresh else 10))
        elif dist.is_available() and dist.is_initialized():
            store = dist.distributed_c10d._get_default_store()
        else:
            return None
    except Exception:  # noqa: BLE001 - no store: every rank reports for itself, as before
        return None
    if not fresh:
        _cache.append(store)
    return store


def _key(what: str) -> str:
    return f"{_USER_ERROR_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{what}"


def _store_add(store: Any, what: str, n: int) -> int | None:
    try:
        return int(store.add(_key(what), n))
    except Exception:  # noqa: BLE001 - the launcher (and its store) may be gone
        return None


def _peer_reported(fresh: bool = False) -> bool:
    store = _shared_store(fresh)
    return store is not None and (_store_add(store, "count", 0) or 0) > 0


def _write_error_file(text: str) -> None:
    """The launcher's failure report (torch elastic's ``ChildFailedError`` block) shows ``text`` as this
    rank's error instead of a pointer to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"message": text, "timestamp": int(time.time())}))
        except OSError:
            pass


def _stop_quietly() -> None:
    """This rank follows another rank's user error: count itself as stopped and exit 2 without a word
    (the launcher's SIGTERM, which may come while it exits, is ignored: it is on its way out)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = _shared_store()
    if store is not None:
        _store_add(store, "stopped", 1)
    _write_error_file("stopped: another rank reported a user error (its error: line is the recipe's last line)")
    raise PeerStopped(2) from None


def _report_last(message: str) -> None:
    """The first rank with a user error: give the other ranks that stop on it too (the same config error
    everywhere) a moment to finish, SIGTERM from the launcher ignored meanwhile, so that its ``error:`` line
    is the last line the recipe prints. Ranks waiting in a collective for this one fail once it exits."""
    _write_error_file(f"error: {message}")
    store = _shared_store()
    if store is None:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deadline = time.monotonic() + _ACK_WAIT_S
    while time.monotonic() < deadline and (_store_add(store, "stopped", 0) or 0) < world - 1:
        time.sleep(0.05)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM outside the training loop: the launcher stopping this rank after another rank's user error
    is a quiet exit 2; any other SIGTERM keeps its default action."""
    if _peer_reported(fresh=True):
        raise PeerStopped(2)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def run_recipe_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """:func:`configs.errors.run_cli` for the training recipes under a launcher (``accelerate launch``).

    A user error on any rank is printed once, by the first rank that reports it, as the last line the
    recipe prints; every other rank stops without a traceback of its own (a collective that fails
    because that rank is gone, the launcher's SIGTERM, or the same user error) and every rank exits 2.
    The ranks agree through the launcher's key-value store; a single process is plain ``run_cli``.
    """
    from configs.errors import USER_ERRORS, debug_requested, one_line, run_cli

    if _shared_store() is None:
        return run_cli(main, argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)

    def guarded(args: list[str]) -> Any:
        try:
            return main(args)
        except USER_ERRORS as exc:
            if debug_requested(args):
                raise
            if _store_add(_shared_store(), "count", 1) not in (None, 1):
                _stop_quietly()  # the same error on several ranks (a config error): said once
            _report_last(one_line(exc))
            raise  # run_cli prints it
        except PeerStopped:
            _stop_quietly()
        except Exception:
            if _peer_reported():
                _stop_quietly()  # e.g. gloo "Connection closed by peer": a consequence, not news
            raise

    return run_cli(guarded, argv)
