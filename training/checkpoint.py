"""Checkpoint / resume of the training state.

Layout of ``<run_dir>/checkpoint-<step>/``::

    model/               written by the caller's ``model_save_fn`` (save_pretrained of
                         model + tokenizer + image processor)
    optimizer.pt         optimizer.state_dict()          (main process)
    scheduler.pt         scheduler.state_dict()          (main process)
    rng_<rank>.pt        python / numpy / torch CPU (+ CUDA) RNG states, one per rank
    trainer_state.json   {"step", "data_state", "router_state", "extra", "world_size", ...}

``step`` is the number of optimizer steps already taken: resuming continues at
optimizer step ``step`` (0-based). A checkpoint is written into
``checkpoint-<step>.tmp`` and renamed when complete, so a crash mid-save never
leaves a directory that :func:`find_latest_checkpoint` would pick.

Optimizer state is saved from the main process only, which is right for DDP
(replicated state). Sharded optimizers (FSDP, ZeRO) need
``accelerator.save_state`` instead; that is not handled here.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """What :func:`load_training_state` returns besides restoring optimizer/scheduler/RNG in place."""

    step: int  # optimizer steps already taken; the next step to run
    data_state: dict[str, Any] = field(default_factory=dict)
    router_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    path: Path | None = None

    @property
    def model_dir(self) -> Path:
        """Where ``model_save_fn`` wrote the model (load weights from here)."""
        assert self.path is not None
        return self.path / "model"


# ---------------------------------------------------------------- rng


def get_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy (global), torch CPU and every CUDA device; ``torch.load(weights_only=True)``-safe."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("checkpoint has CUDA RNG states but CUDA is not available; resume on a GPU machine")
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------- helpers


def _rank_info(accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes), bool(accelerator.is_main_process)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        return rank, torch.distributed.get_world_size(), rank == 0
    return 0, 1, True


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with ``trainer_state.json``) in ``run_dir``, sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``checkpoint-<step>`` with the highest step, or ``None``."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def rotate_checkpoints(run_dir: str | Path, save_total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest checkpoints beyond ``save_total_limit`` (never ``keep``); return the deleted dirs."""
    if save_total_limit is None:
        return []
    if save_total_limit < 1:
        raise ValueError(f"training.save_total_limit must be >= 1 or null, got {save_total_limit}")
    ckpts = [p for _, p in list_checkpoints(run_dir)]
    removable = [p for p in ckpts if keep is None or p.resolve() != Path(keep).resolve()]
    excess = len(ckpts) - save_total_limit
    deleted = removable[: max(excess, 0)]
    for path in deleted:
        shutil.rmtree(path)
    return deleted


# ----------------------------------------------------------------- save


def save_training_state(
    out_dir: str | Path,
    *,
    accelerator: Any = None,
    model_save_fn: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    data_state: dict[str, Any],
    router_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Write ``<out_dir>/checkpoint-<step>/`` and rotate; every rank must call it.

    ``model_save_fn(model_dir)`` is called on every rank (FSDP/ZeRO gathers
    need all of them) and must itself write only on the main process, e.g.
    ``unwrap(model).save_pretrained(d, is_main_process=acc.is_main_process,
    save_function=acc.save)`` plus the tokenizer and image processor.
    ``data_state`` / ``router_state`` / ``extra`` must be JSON-serialisable.
    Returns the final checkpoint directory.
    """
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"training.save_total_limit must be >= 1 or null, got {save_total_limit}")
    rank, world, is_main = _rank_info(accelerator)
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": world,
        "data_state": data_state,
        "router_state": router_state,
        "extra": extra or {},
    }
    # Serialise before anything touches the disk: a non-JSON value fails here, on every rank alike.
    try:
        state_text = json.dumps(state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"checkpoint step {step}: data_state / router_state / extra must be JSON-serialisable ({exc})"
        ) from exc

    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of a crashed save
        (tmp / "model").mkdir(parents=True)
    _barrier(accelerator)
    model_save_fn(tmp / "model")
    torch.save(get_rng_state(), tmp / f"rng_{rank}.pt")
    if is_main:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _barrier(accelerator)
    if is_main:
        # trainer_state.json last: its presence marks the checkpoint complete.
        (tmp / "trainer_state.json").write_text(state_text + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        rotate_checkpoints(out_dir, save_total_limit, keep=final)
    _barrier(accelerator)
    return final


# ----------------------------------------------------------------- load


def load_training_state(
    ckpt_dir: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    accelerator: Any = None,
    restore_rng: bool = True,
) -> TrainerState:
    """Restore optimizer, scheduler and this rank's RNG from ``ckpt_dir``; return the :class:`TrainerState`.

    The model weights are the caller's to load from ``state.model_dir``.
    RNG restore needs ``rng_<rank>.pt`` for this rank: resuming on a different
    number of processes fails unless ``restore_rng=False``.
    """
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} missing: {ckpt_dir} is not a complete checkpoint (training.resume_from: a checkpoint-<step> dir or 'latest')"
        )
    raw = json.loads(state_file.read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{state_file}: format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    rank, _, _ = _rank_info(accelerator)
    map_location = "cpu"
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=map_location, weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", map_location=map_location, weights_only=True))
    if restore_rng:
        rng_file = ckpt_dir / f"rng_{rank}.pt"
        if not rng_file.is_file():
            raise FileNotFoundError(
                f"{rng_file} missing: checkpoint was saved with world_size={raw.get('world_size')}; "
                "resume with that many processes, or pass restore_rng=False (RNG streams then differ)"
            )
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return TrainerState(
        step=int(raw["step"]),
        data_state=raw.get("data_state") or {},
        router_state=raw.get("router_state"),
        extra=raw.get("extra") or {},
        world_size=int(raw.get("world_size", 1)),
        path=ckpt_dir,
    )
