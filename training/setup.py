"""Accelerator, seed, run directory and logging set-up shared by both trainers."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from configs.validation import declared_enum
from core.vocab import LOGGER_NAME

METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step, in the run dir (docs/RUN_DIR.md)
MIXED_PRECISION = declared_enum("training.mixed_precision")


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, seed: int = 42,
                     collective_timeout_s: int | None = None, **kwargs: Any):
    """``accelerate.Accelerator`` + ``set_seed(seed)`` (same seed on every rank: identical model init).

    ``collective_timeout_s`` (``training.collective_timeout_s``) bounds how long a collective waits
    for the other ranks: a frozen or lost rank becomes an error on the others instead of a hang.

    ``kwargs`` go to ``Accelerator`` unchanged. Per-rank randomness (rollout
    sampling) should derive its own generator from ``seed`` and the rank.

    ``step_scheduler_with_optimizer`` defaults to False: our schedules count
    optimizer steps, and a prepared scheduler would otherwise be stepped
    ``num_processes`` times per call. Call ``scheduler.step()`` once per
    optimizer step (when ``accelerator.sync_gradients``).
    """
    kwargs.setdefault("step_scheduler_with_optimizer", False)
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}"
        )
    if gradient_accumulation_steps < 1:
        raise ValueError(f"training.gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if collective_timeout_s is not None:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        timeout = timedelta(seconds=collective_timeout_s)
        handlers = list(kwargs.pop("kwargs_handlers", None) or [])
        given = [h for h in handlers if isinstance(h, InitProcessGroupKwargs)]
        for handler in given:  # a caller's own init kwargs (e.g. init_method) keep theirs, with this timeout
            handler.timeout = timeout
        if not given:
            handlers.append(InitProcessGroupKwargs(timeout=timeout))
        kwargs["kwargs_handlers"] = handlers

    if kwargs.get("cpu"):
        from accelerate.utils import InitProcessGroupKwargs

        from training.sharding import prepare_cpu_sharding

        # a sharded launch config on CPU: take accelerate's FSDP / DeepSpeed path over gloo, with the
        # same process-group settings (collective timeout) Accelerator would use
        init = [h.to_kwargs() for h in kwargs.get("kwargs_handlers") or [] if isinstance(h, InitProcessGroupKwargs)]
        kwargs["cpu"] = prepare_cpu_sharding(init[0] if init else None)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, **kwargs
    )
    set_seed(seed)
    return accelerator


@contextmanager
def each_node_first(accelerator) -> Iterator[None]:
    """Run the body on global rank 0 first, then on local rank 0 of every other node, then on every
    other rank, with the rest waiting (two barriers, on every rank).

    For the files a recipe creates on first use that every node reads (the tiny checkpoint, the
    synthetic shapes data, the Arrow record cache and its lengths / packing plan). The body must be
    idempotent (build when absent or incomplete, else only read): on a filesystem all nodes share,
    global rank 0 builds and the other nodes find the files complete and read them; on node-local
    disks (a relative path under each node's own working directory) each node's local rank 0
    builds its own copy once. Either way no two processes ever write the same file. Files only the
    run writes (run dir, resolved config, metrics, checkpoints, eval output, run lock) belong to the
    shared ``run.output_dir`` and are written by global rank 0 (``accelerator.is_main_process``)
    alone; docs/SCALING.md "Multi-node".
    """
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    main, local_main = accelerator.is_main_process, accelerator.is_local_main_process
    if not main:
        accelerator.wait_for_everyone()  # 1: global rank 0 has built
    if not local_main:
        accelerator.wait_for_everyone()  # 2: this node's local rank 0 has built (or found it shared)
    try:
        yield
    finally:
        if main:
            accelerator.wait_for_everyone()
        if local_main:
            accelerator.wait_for_everyone()


def what_run_holds(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` holds a run (a complete checkpoint, or a logged step in ``metrics.jsonl``), else None.

    A run that died before its first logged step (no checkpoint, empty ``metrics.jsonl``) holds
    nothing: a rerun may use the dir.
    """
    from training.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return f"checkpoint-{ckpts[-1][0]}"
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.read_text(encoding="utf-8", errors="replace").strip():
        return "logged steps in metrics.jsonl, no checkpoint to resume from"
    return None


def run_dir_in_use(run_dir: str | Path) -> FileExistsError | None:
    """The error for starting a fresh run in ``run_dir`` when it holds one (None when it does not);
    the fixes it names all work: resuming is offered only when there is a checkpoint."""
    held = what_run_holds(run_dir)
    if held is None:
        return None
    resume = ", resume it with --set training.resume_from=latest" if held.startswith("checkpoint-") else ""
    return FileExistsError(f"{run_dir} already holds a run ({held}); pick another run.name{resume}, "
                           "or replace it with --set run.overwrite=true")


def make_run_dir(output_dir: str | Path, run_name: str) -> Path:
    """Create and return ``<output_dir>/<run_name>`` (``run.output_dir`` / ``run.name``, a plain name: the
    config schema checks it; :func:`run_dir_in_use` says whether it already holds a run)."""
    run_dir = Path(output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def setup_logging(
    run_dir: str | Path | None = None, is_main_process: bool = True, level: int = logging.INFO
) -> logging.Logger:
    """The ``coordexp`` logger: stderr on the main process (WARNING elsewhere), plus ``<run_dir>/train.log``."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level if is_main_process else logging.WARNING)
    for handler in list(logger.handlers):  # idempotent: tests and notebooks call this repeatedly
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if run_dir is not None and is_main_process:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger


def log_run_header(
    logger: logging.Logger,
    *,
    config_path: str | Path | None,
    run_name: str,
    seed: int,
    pipeline_identity: Mapping[str, Any] | None = None,
) -> None:
    """Log config path, run name, seed and the pipeline identity (docs/training/PIPELINE.md): the normalised
    manifest dict with its ``checksum``, the object ``configs.loader.save_resolved`` writes to ``pipeline.json``."""
    logger.info("config: %s", config_path)
    logger.info("run: %s  seed: %d", run_name, seed)
    if pipeline_identity is not None:
        logger.info("pipeline: %s", json.dumps(dict(pipeline_identity), sort_keys=True, default=str))
