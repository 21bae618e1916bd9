"""Checkpoint / resume of the training state.

Layout of ``<run_dir>/checkpoint-<step>/``::

    model/               written by the caller's ``model_save_fn`` (save_pretrained of
                         model + tokenizer + image processor)
    optimizer.pt         optimizer.state_dict()          (main process; DDP / single process)
    scheduler.pt         scheduler.state_dict()          (main process; DDP / single process)
    sharded/             accelerator.save_state: model + optimizer shards, scheduler
                         (FSDP / DeepSpeed, in the engine's own format; replaces the two files above)
    rng_<rank>.pt        python / numpy / torch CPU (+ CUDA) RNG states, one per rank
    trainer_state.json   {"step", "data_state", "router_state", "extra", "world_size", ...}
    manifest.json        {"format_version", "files": {relative path: {"size", "sha256"}}} of every
                         other file, written last

``step`` is the number of optimizer steps already taken: resuming continues at
optimizer step ``step`` (0-based). A checkpoint is written into
``checkpoint-<step>.tmp`` and renamed when complete, so a crash mid-save never
leaves a directory that :func:`find_latest_checkpoint` would pick.

The manifest lists whatever files the save wrote (any layout, sharded or not);
:func:`verify_checkpoint` checks sizes and SHA-256 sums against it, and
:func:`resolve_resume` runs it before a resume, so a truncated or corrupted file
is reported by checkpoint and file name, and ``resume_from: latest`` falls back
to the previous complete checkpoint.

Under DDP the optimizer state is replicated and saved from the main process. Under FSDP and
DeepSpeed it is sharded: every rank writes its shards through ``accelerator.save_state`` into
``sharded/``, and resume reads them back through ``accelerator.load_state`` (the model's exact
fp32 master weights included, so the resumed run continues exactly). ``model/`` is then the
gathered full model, for eval and inference. Resume needs the same engine and world size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configs.errors import UserError
from core.vocab import LOGGER_NAME
from model.shapes import logical_numel

FORMAT_VERSION = 2  # 2: manifest.json with sizes and SHA-256 of every file
MANIFEST = "manifest.json"
SHARDED_DIR = "sharded"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(LOGGER_NAME)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the checkpoint dir and the file."""


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


# ------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """Write ``manifest.json``: size and SHA-256 of every other file under ``ckpt_dir``; return it."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        path.relative_to(ckpt_dir).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(ckpt_dir.rglob("*"))
        if path.is_file() and path.relative_to(ckpt_dir).as_posix() != MANIFEST
    }
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (ckpt_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def checkpoint_size(ckpt_dir: str | Path) -> int:
    """Bytes of a checkpoint according to its manifest (0 when it has none)."""
    try:
        manifest = json.loads((Path(ckpt_dir) / MANIFEST).read_text())
        return sum(int(f["size"]) for f in manifest["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Check every file of ``manifest.json`` (present, size, SHA-256); raise :class:`CheckpointError` naming the file."""
    ckpt_dir = Path(ckpt_dir)
    manifest_file = ckpt_dir / MANIFEST
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir}: not a directory")
    if not manifest_file.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: {MANIFEST} missing (an incomplete checkpoint, or one written before "
            f"checkpoints carried checksums: format_version {FORMAT_VERSION})"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}: {MANIFEST}: format_version {manifest.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} is not a valid manifest ({exc})") from None
    if "trainer_state.json" not in files:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {MANIFEST} does not list trainer_state.json")
    for rel, entry in files.items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: {rel} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}: {rel} is {size} bytes, {entry['size']} when saved (truncated or overwritten)"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {rel} does not match its SHA-256 from the save (corrupted)")


def resolve_resume(run_dir: str | Path, resume_from: str) -> Path:
    """The checkpoint ``training.resume_from`` names, verified.

    ``"latest"``: the newest checkpoint in ``run_dir`` that verifies; each newer one that does not is
    skipped with a warning. A path: that checkpoint, or :class:`CheckpointError` naming the bad file.
    """
    if resume_from != "latest":
        verify_checkpoint(resume_from)
        return Path(resume_from)
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("resume_from=latest: skipping %s: %s; trying the previous checkpoint", path.name, exc)
            skipped.append(str(exc))
            continue
        return path
    if skipped:
        raise CheckpointError(
            f"training.resume_from=latest: no complete checkpoint under {run_dir}; every one failed verification: "
            + "; ".join(skipped)
        )
    raise FileNotFoundError(f"training.resume_from=latest: no checkpoint-<step> under {run_dir}")


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
    rng_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/checkpoint-<step>/`` and rotate; every rank must call it.

    ``model_save_fn(model_dir)`` is called on every rank (FSDP/ZeRO gathers
    need all of them) and must itself write only on the main process, e.g.
    ``unwrap(model).save_pretrained(d, is_main_process=acc.is_main_process,
    save_function=acc.save)`` plus the tokenizer and image processor.
    ``data_state`` / ``router_state`` / ``extra`` must be JSON-serialisable. ``rng_state``: this
    rank's RNG states to write (:func:`get_rng_state` of an earlier moment; default: the current ones).
    Returns the final checkpoint directory.
    """
    if save_total_limit is not None and save_total_limit < 1:
        raise ValueError(f"training.save_total_limit must be >= 1 or null, got {save_total_limit}")
    from training.sharding import is_sharded

    rank, world, is_main = _rank_info(accelerator)
    sharded = is_sharded(accelerator)
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"checkpoint-{step}.tmp"
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": world,
        "sharded": sharded,
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
        check_free_space(out_dir, estimate_checkpoint_bytes(out_dir, optimizer))
    error = None
    try:  # every rank gets past this block and into the agreement below, whatever fails
        if is_main:
            (tmp / "model").mkdir(parents=True)
    except Exception as exc:  # noqa: BLE001 - agreed on and re-raised below
        error = exc
    if _all_ok(accelerator, error is None):
        try:
            model_save_fn(tmp / "model")
            torch.save(get_rng_state() if rng_state is None else rng_state, tmp / f"rng_{rank}.pt")
            if sharded:  # every rank writes its own shards
                accelerator.save_state(str(tmp / SHARDED_DIR))
            elif is_main:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        except Exception as exc:  # noqa: BLE001
            error = exc
        if _all_ok(accelerator, error is None) and is_main:
            try:
                # trainer_state.json, then the manifest of everything, last: with the rename they mark it complete.
                (tmp / "trainer_state.json").write_text(state_text + "\n")
                write_manifest(tmp)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            except Exception as exc:  # noqa: BLE001
                error = exc
    if not _all_ok(accelerator, error is None):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(accelerator)
        raise _save_failed(error, out_dir, step, estimate_checkpoint_bytes(out_dir, optimizer))
    if is_main:  # old checkpoints go only once the new one is complete
        rotate_checkpoints(out_dir, save_total_limit, keep=final)
    _barrier(accelerator)
    return final


# ----------------------------------------------------------- disk space


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def estimate_checkpoint_bytes(out_dir: str | Path, optimizer: Any = None) -> int:
    """Bytes the next checkpoint will take: the newest one's manifest total, else (first save) three
    times the optimized parameters (weights + two Adam moments)."""
    ckpts = list_checkpoints(out_dir)
    if ckpts and (size := checkpoint_size(ckpts[-1][1])):
        return size
    params = [p for group in getattr(optimizer, "param_groups", ()) for p in group["params"]]
    return 3 * sum(logical_numel(p) * p.element_size() for p in params)


def check_free_space(out_dir: str | Path, needed: int) -> None:
    """Warn when the run dir's file system has room for fewer than two more checkpoints of ``needed`` bytes."""
    free = shutil.disk_usage(out_dir).free
    if needed and free < 2 * needed:
        logger.warning(
            "%s has %s free and a checkpoint takes about %s: %s; free space or move run.output_dir",
            out_dir, _human(free), _human(needed),
            "this save will probably fail" if free < needed else "the save after this one may not fit",
        )


def _save_failed(error: BaseException | None, out_dir: Path, step: int, needed: int) -> Exception:
    """The one error a failed save raises on every rank (the partial ``.tmp`` is already removed)."""
    import errno

    resume = (" Then rerun with --set training.resume_from=latest (it resumes from the newest complete checkpoint)."
              if list_checkpoints(out_dir) else "")
    if error is None:
        return CheckpointError(f"checkpoint-{step}: another rank failed to write its part into {out_dir} "
                               f"(its error is in that rank's log); the partial checkpoint-{step}.tmp was removed.")
    free = shutil.disk_usage(out_dir).free
    no_space = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or free < needed
    if no_space:
        return CheckpointError(
            f"checkpoint-{step}: no space left on the device of {out_dir}: {_human(free)} free after removing the "
            f"partial checkpoint-{step}.tmp, a checkpoint needs about {_human(needed)}. Free space (or lower "
            f"training.save_total_limit, or move run.output_dir).{resume} ({type(error).__name__}: {error})"
        )
    return CheckpointError(
        f"checkpoint-{step}: writing it into {out_dir} failed ({type(error).__name__}: {error}); the partial "
        f"checkpoint-{step}.tmp was removed.{resume}"
    )


def _all_ok(accelerator: Any, ok: bool) -> bool:
    """True on every rank when ``ok`` on every rank; a barrier that also carries failure."""
    if accelerator is not None:
        from training.faults import any_rank

        return not any_rank(accelerator, not ok)[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([0 if ok else 1])
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0
    return ok


# ----------------------------------------------------------------- load


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint dir (``step``, ``data_state``, ...), checked for completeness."""
    ckpt_dir = Path(ckpt_dir)
    state_file = ckpt_dir / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} missing: {ckpt_dir} is not a complete checkpoint (training.resume_from: a checkpoint-<step> dir or 'latest')"
        )
    try:
        raw = json.loads(state_file.read_text())
        raw["step"] = int(raw["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt_dir}: trainer_state.json is not valid ({type(exc).__name__}: {exc})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: trainer_state.json: format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return raw


def load_training_state(
    ckpt_dir: str | Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    *,
    accelerator: Any = None,
    restore_rng: bool = True,
) -> TrainerState:
    """Restore optimizer, scheduler and this rank's RNG from ``ckpt_dir``; return the :class:`TrainerState`.

    The model weights are the caller's to load from ``state.model_dir``, except under FSDP /
    DeepSpeed, where ``accelerator.load_state`` also restores the prepared model's shards. File
    checksums are :func:`resolve_resume`'s job (run it first); a file that still cannot be read raises
    :class:`CheckpointError` naming the checkpoint and the file.
    RNG restore needs ``rng_<rank>.pt`` for this rank: resuming on a different
    number of processes fails unless ``restore_rng=False``.
    """
    ckpt_dir = Path(ckpt_dir)
    raw = read_trainer_state(ckpt_dir)
    from training.sharding import is_sharded

    rank, _, _ = _rank_info(accelerator)

    def load(name: str) -> Any:
        try:
            return torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: name it
            raise CheckpointError(f"checkpoint {ckpt_dir}: {name} cannot be read ({type(exc).__name__}: {exc})") from exc

    saved_sharded, sharded = bool(raw.get("sharded", False)), is_sharded(accelerator)
    if saved_sharded != sharded:
        engines = {True: "FSDP / DeepSpeed", False: "DDP / single process"}
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written under {engines[saved_sharded]} but this run uses {engines[sharded]}: "
            "resume with the accelerate launch config that wrote it (configs/accelerate/), or start a new run from "
            f"{ckpt_dir / 'model'} (model.name_or_path)"
        )
    if sharded:  # model shards (exact master weights), optimizer shards, scheduler
        try:
            accelerator.load_state(str(ckpt_dir / SHARDED_DIR))
        except Exception as exc:  # noqa: BLE001 - name the checkpoint
            raise CheckpointError(f"checkpoint {ckpt_dir}: {SHARDED_DIR}/ cannot be loaded ({type(exc).__name__}: {exc})") from exc
    else:
        if optimizer is not None:
            optimizer.load_state_dict(load("optimizer.pt"))
        if scheduler is not None:
            scheduler.load_state_dict(load("scheduler.pt"))
    if restore_rng:
        rng_file = ckpt_dir / f"rng_{rank}.pt"
        if not rng_file.is_file():
            raise FileNotFoundError(
                f"{rng_file} missing: checkpoint was saved with world_size={raw.get('world_size')}; "
                "resume with that many processes, or pass restore_rng=False (RNG streams then differ)"
            )
        set_rng_state(load(rng_file.name))
    return TrainerState(
        step=raw["step"],
        data_state=raw.get("data_state") or {},
        router_state=raw.get("router_state"),
        extra=raw.get("extra") or {},
        world_size=int(raw.get("world_size", 1)),
        path=ckpt_dir,
    )
