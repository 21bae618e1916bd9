"""Run a function on 2 local gloo ranks (torch.multiprocessing.spawn) with a hang guard."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp


def spawn_ranks(fn, args: tuple, *, nprocs: int = 2, timeout_s: float = 60, what: str = "ranks") -> None:
    """``fn(rank, *args)`` on ``nprocs`` processes; kill them and fail the test when they hang past ``timeout_s``.

    Workers rendezvous through a FileStore (``init_method="file://..."``) under the test's tmp_path:
    no TCP port to pick, so no race with other processes on the machine.
    """
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} hung (collectives out of step)")
