"""Recipe building blocks shared by ``train_stage1.py`` and ``train_stage2.py``.

Each function does one visible step of a recipe (resolve the checkpoint, load the
model, read the data, build the packed dataset, save a checkpoint, run an eval) so
that the recipes themselves read top to bottom without repeating this code.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from configs.errors import UserError, clip
from configs.loader import RESOLVED_FILENAME, save_resolved
from configs.types import Config, thaw
from core.vocab import IGNORE, LOGGER_NAME, STAGE2_ROLLOUT_ALIGNED, STAGE2_TWO_CHANNEL
from data.encoding import ChatEncoder, EncodedRecords
from data.packing import PackedDataset, iterate_batches
from data.records import require_records
from data.shapes import make_shapes_dataset
from data.table import ReadOptions, cached_packing, open_records
from data.types import PackedBatch, Record
from eval.detection import read_lvis_lists
from eval.inloop import run_rollout_eval
from model.adapters import apply_adapter, load_adapter_weights, save_adapter, spec_from_config
from model.loading import PARTS, LoadedModel, apply_freeze, load_model_and_processors, memory_summary, param_parts
from model.settings import CheckpointSettings, inherit, settings_of, write_settings
from model.shapes import logical_numel
from model.tiny import build_tiny_checkpoint
from pipeline.wrapper import ExpectationConfig, TrainingWrapper
from rollout.backends import GenerationBackend, make_generation_backend
from training.aggregator import MetricAggregator
from training.checkpoint import (
    TrainerState,
    find_latest_checkpoint,
    get_rng_state,
    list_checkpoints,
    load_training_state,
    read_trainer_state,
    resolve_resume,
    save_training_state,
)
from training.faults import (
    LOCK_NAME,
    NONFINITE_METRIC,
    InterruptFlag,
    NonFiniteError,
    NonFiniteGuard,
    RunLock,
    TrainingInterrupted,
    acquire_run_lock,
    main_process_decides,
    weights_finite,
)
from training.optim import build_optimizer, build_scheduler
from training.preflight import adds_coord_tokens, check_environment, check_model_path, check_paths
from training.progress import TrainProgress
from training.setup import (
    METRICS_FILE,
    each_node_first,
    log_run_header,
    make_accelerator,
    make_run_dir,
    run_dir_in_use,
    setup_logging,
    what_run_holds,
)
from training.sharding import configure_engine, full_weights, register_direct_weights
from training.tracking import Tracker, truncate_metrics_after

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class RunContext:
    """What every recipe sets up first: the accelerator, the run dir, the logger, the pipeline identity."""

    accelerator: Accelerator
    run_dir: Path
    logger: logging.Logger
    identity: dict
    resume_dir: Path | None
    lock: RunLock | None = None  # held by the main process


def with_checkpoint_settings(cfg: Config) -> tuple[Config, tuple[tuple[int, str], ...]]:
    """``(cfg, notes)``: the config with the data settings it leaves unset taken from the settings saved
    with ``model.name_or_path`` (``model.settings.inherit``: Stage-2 on a Stage-1 output trains and
    evaluates on the input Stage-1 saw), and the lines :func:`start_run` logs (what was taken; each key
    the config sets to another value than the checkpoint's, at warning level). A hub checkpoint or the
    tiny builder has no saved settings: the config is returned as is."""
    if cfg.model.tiny.enabled or not cfg.model.name_or_path:
        return cfg, ()
    cfg, taken, differences = inherit(cfg, cfg.model.name_or_path)
    return cfg, (*((logging.INFO, taken),) * bool(taken), *((logging.WARNING, d) for d in differences))


def start_run(cfg: Config, notes: Sequence[tuple[int, str]] = ()) -> RunContext:
    """Accelerator + seed, the run lock, run dir, resolved config, start-up log of config path / run name /
    seed / pipeline identity (docs/training/PIPELINE.md), and the verified checkpoint to resume from (``training.resume_from``).
    ``notes``: ``(level, line)`` pairs logged once the log is open (:func:`with_checkpoint_settings`)."""
    t = cfg.training
    check_paths(cfg)  # a wrong model dir / data file / image root fails now, naming its key
    warnings = check_environment(cfg)  # tracker credentials, processes vs devices, rollout backend
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # `accelerate launch --multi_gpu` on a machine without CUDA sets WORLD_SIZE but accelerate then picks
    # no backend: every process would run alone and believe it is the main process (duplicate logs,
    # racing checkpoint writes). Multi-process without GPUs means CPU DDP over gloo.
    cpu = world > 1 and not torch.cuda.is_available()
    accelerator = make_accelerator(t.mixed_precision, t.gradient_accumulation_steps, cfg.run.seed,
                                   collective_timeout_s=t.collective_timeout_s,
                                   **({"cpu": True} if cpu else {}))
    if accelerator.num_processes != world:
        raise UserError(
            f"launched with WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); check the accelerate launch config (configs/accelerate/)"
        )
    run_dir = cfg.run.run_dir
    # One live run per run dir, before anything in it is read or deleted (run.overwrite included).
    lock = main_process_decides(accelerator, lambda: acquire_run_lock(run_dir))
    lock = lock if accelerator.is_main_process else None  # only the holder releases it
    with _released_on_error(lock):
        run = _start_locked_run(cfg, accelerator, run_dir, lock)
    if accelerator.is_main_process:
        for warning in warnings:
            run.logger.warning(warning)
    for level, line in notes:
        run.logger.log(level, "checkpoint settings: %s", line)
    return run


@contextmanager
def _released_on_error(lock):
    """Release the run lock when recipe set-up fails (the recipe's ``finish_run`` releases it otherwise)."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _start_locked_run(cfg: Config, accelerator, run_dir: Path, lock) -> RunContext:
    t = cfg.training
    # Checked before anything is written: a resume that cannot train must not touch the run dir.
    # Verified (sizes + SHA-256) once, on the main process; `latest` skips a corrupt one.
    resume_dir = main_process_decides(accelerator, lambda: resume_point(cfg, run_dir)) if t.resume_from else None
    # Two runs in one dir would interleave metrics.jsonl and checkpoints: refuse unless told to replace it.
    in_use = None if t.resume_from else run_dir_in_use(run_dir)
    used = in_use is not None
    accelerator.wait_for_everyone()  # every rank looks before anything is deleted (barriers unconditional)
    if used and not cfg.run.overwrite:
        raise in_use
    if used:
        main_process_decides(accelerator, lambda: replace_run_dir(run_dir))
    accelerator.wait_for_everyone()
    run_dir = make_run_dir(cfg.run.output_dir, cfg.run.name)
    run_logger = setup_logging(run_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_resolved(cfg, run_dir)
    identity = cfg.pipeline.to_dict()
    log_run_header(run_logger, config_path=cfg.path, run_name=cfg.run.name, seed=cfg.run.seed,
                   pipeline_identity=identity)
    if resume_dir is not None and accelerator.is_main_process:  # before the tracker opens metrics.jsonl
        step = int(read_trainer_state(resume_dir)["step"])
        dropped = truncate_metrics_after(run_dir / METRICS_FILE, step)
        if dropped:
            run_logger.info("metrics.jsonl: dropped %d line(s) logged after step %d by the interrupted run", dropped, step)
    return RunContext(accelerator, run_dir, run_logger, identity, resume_dir, lock)


def replace_run_dir(run_dir: Path) -> None:
    """``run.overwrite``: empty ``run_dir`` (but our lock), only when it is a real directory that holds this
    project's run (its ``config.resolved.yaml``, written first by every run); never through a symlink, never
    a folder something else wrote. Children that are links are unlinked, never followed."""
    if run_dir.is_symlink():
        raise UserError(f"run.overwrite: {run_dir} is a symlink (to {os.readlink(run_dir)}); overwrite never deletes "
                        "through a link: remove the link, or pick another run.name")
    if not (run_dir / RESOLVED_FILENAME).is_file():
        raise UserError(f"run.overwrite: {run_dir} holds no {RESOLVED_FILENAME}, so it is not a run dir of this "
                        "project and overwrite does not delete it; pick another run.name or run.output_dir, or "
                        "delete it yourself")
    for child in run_dir.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint ``training.resume_from`` names (None when not resuming), checked to exist and to
    leave steps to train (its step < ``training.max_steps``); every error names the fix."""
    t = cfg.training
    if not t.resume_from:
        return None
    if t.resume_from == "latest" and not list_checkpoints(run_dir):
        fresh = ("start afresh with --set run.overwrite=true (replaces it)" if what_run_holds(run_dir)
                 else "drop training.resume_from to start afresh")
        raise FileNotFoundError(f"training.resume_from=latest: no checkpoint-<step> under {run_dir} to resume; {fresh}")
    resume_dir = resolve_resume(run_dir, t.resume_from)  # verified; `latest` skips a corrupt one
    state = read_trainer_state(resume_dir)
    step = int(state["step"])
    if step >= t.max_steps:
        raise UserError(f"training.max_steps={t.max_steps} but {resume_dir} is already at step {step}: nothing left "
                        f"to train; raise it to continue (e.g. --set training.max_steps={step + max(step, 1)})")
    check_resume_config(cfg, resume_dir, (state.get("extra") or {}).get("config"))
    return resume_dir


# The config keys (dotted prefixes) a resume may change: how long to train, when to save / eval / log, where
# the run is written (resume_from may name another run's checkpoint), where data and caches are read from. Every other key shapes the model, the optimizer or the data order that the
# checkpoint holds, and a resume that changed one would silently train the checkpoint's setting instead.
RESUME_MAY_CHANGE = (
    "training.max_steps", "training.resume_from", "training.save_every", "training.save_total_limit",
    "training.eval_every", "training.save_on_interrupt", "training.max_consecutive_nonfinite",
    "training.collective_timeout_s", "training.on_sigusr1", "run.name", "run.output_dir", "run.overwrite",
    "run.log_every", "run.tracker", "eval",
    "data.num_workers", "data.cache_dir", "data.train_jsonl", "data.val_jsonl", "data.image_root",
    "data.synthetic.out_dir", "model.tiny.dir",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: thaw(tree)}


def check_resume_config(cfg: Config, resume_dir: Path, saved: dict | None) -> None:
    """Refuse a resume whose config differs from the one ``resume_dir`` was trained with in any key outside
    :data:`RESUME_MAY_CHANGE`, naming the keys and both values."""
    if saved is None:
        logger.warning("%s records no config (an older checkpoint): the model and optimizer keys are not compared",
                       resume_dir)
        return
    now, then = _flat(thaw(cfg.resolved)), _flat(saved)
    changed = sorted(k for k in now.keys() | then.keys()
                     if now.get(k) != then.get(k) and not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE))
    if not changed:
        return
    shown = "; ".join(f"{k}: {clip(repr(then.get(k)), 60)} in the checkpoint, {clip(repr(now.get(k)), 60)} now"
                      for k in changed[:5])
    more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
    raise UserError(
        f"training.resume_from: {resume_dir.name} was trained with other values of keys that shape the model, the "
        f"optimizer or the data ({shown}{more}); a resume continues the checkpoint's setting, so these cannot change "
        f"(only {', '.join(RESUME_MAY_CHANGE[:4])}, ... may: docs/RELIABILITY.md). Restore them, or start a new run "
        f"from its weights: --set model.name_or_path={resume_dir / 'model'} (with model.tiny.enabled=false) and a "
        "new run.name, without training.resume_from")


def make_tracker(cfg: Config, run: RunContext) -> Tracker:
    tr = cfg.run.tracker
    return Tracker(run.run_dir, tr.backend, tr.mode, tr.project, tr.entity, cfg.run.name,
                   config={"config": cfg.resolved, "pipeline": run.identity}, tags=tr.tags,
                   is_main_process=run.accelerator.is_main_process)


def make_train_dataset(cfg: Config, samples: EncodedRecords, accelerator: Accelerator) -> PackedDataset:
    """Static packing over the whole train set (the Stage-1 policy), sharded by rank, resumable.

    The token lengths and the packing plan are computed once per node (global rank 0 first, then any
    node that does not see its files: ``training.setup.each_node_first``) and cached beside the record
    table (``data.table.cached_packing``); every rank reads them."""
    t = cfg.training
    lengths, rows = cached_packing(samples.records, samples.encoder, t.max_length, t.packing,
                                   main_process_first=lambda: each_node_first(accelerator),
                                   procs=cfg.data.cache_build_procs)
    dataset = PackedDataset(
        samples, t.max_length, t.batch_size, t.packing, seed=cfg.run.seed, lengths=lengths, rows=rows,
        num_replicas=accelerator.num_processes, rank=accelerator.process_index,
    )
    logger.info("data: %d packed rows, %d micro-batches per epoch per rank", len(dataset.rows), len(dataset))
    return dataset


def micro_batches(cfg: Config, s: TrainingSetup) -> Iterator[PackedBatch]:
    """Collated micro-batches across epochs on ``data.num_workers`` loader workers (resumable)."""
    for batch in iterate_batches(s.dataset, s.pad_id, num_workers=cfg.data.num_workers,
                                 skip_invalid=cfg.data.skip_invalid):
        for message in batch.skipped:
            logger.warning("data.skip_invalid: skipped a training sample: %s", message)
        yield batch


def should(every: int, done: int, max_steps: int) -> bool:
    """Periodic action after ``done`` optimizer steps: every ``every`` steps (0 = never) and at the end."""
    return bool(every and done % every == 0) or done == max_steps


def resolve_checkpoint(cfg: Config, *, resume_model_dir: Path | None = None, accelerator=None) -> str:
    """The directory (or HF id) to load weights from: a resumed checkpoint, the tiny builder, or ``model.name_or_path``.

    The tiny checkpoint is built by global rank 0 while the other ranks wait (``accelerator`` given;
    then local rank 0 of a node that does not share the directory builds its own copy:
    ``training.setup.each_node_first``); they then find it complete. Without the wait every rank would
    write the same files at once, and a rank could read a half-written checkpoint.
    """
    if resume_model_dir is not None:
        return str(resume_model_dir)
    if cfg.model.tiny.enabled:
        tiny = cfg.model.tiny
        with each_node_first(accelerator):
            return build_tiny_checkpoint(tiny.dir, seed=tiny.seed, hidden=tiny.hidden, layers=tiny.layers,
                                         vision_hidden=tiny.vision_hidden, vision_depth=tiny.vision_depth,
                                         intermediate=2 * tiny.hidden, max_pixels=tiny.max_pixels,
                                         init_std=tiny.init_std, coord_init=tiny.coord_init)
    return check_model_path(cfg)


def load_model(cfg: Config, name_or_path: str, *, adapter_weights: Path | None = None) -> LoadedModel:
    """Load model + tokenizer + image processor, add coord tokens, apply freeze (or the adapter) and
    checkpointing switches. ``adapter_weights``: a checkpoint's model dir whose adapter tensors a
    resumed adapter run loads on top of the base ``name_or_path``."""
    loaded = load_model_and_processors(
        name_or_path,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        add_coord_tokens=adds_coord_tokens(cfg),  # Stage-2 refuses a model without them
        coord_init=cfg.model.coord_tokens.init,
        key="model.name_or_path",
    )
    spec = spec_from_config(cfg.model.adapter)
    if spec.enabled:
        counts = apply_adapter(loaded.model, spec, loaded.coord_vocab, seed=cfg.run.seed)
        if adapter_weights is not None:
            load_adapter_weights(loaded.model, adapter_weights)
    else:
        counts = apply_freeze(
            loaded.model,
            vision=cfg.model.freeze.vision,
            merger=cfg.model.freeze.merger,
            language_model=cfg.model.freeze.language_model,
        )
    logger.info("model %s: %s", name_or_path, counts)
    logger.info("model memory: %s", memory_summary(loaded.model))
    half = sum(logical_numel(p) for p in loaded.model.parameters() if p.requires_grad and p.dtype != torch.float32)
    if half:  # an adapter's tensors are fp32 over a half-precision frozen base: no warning then
        logger.warning(
            "model.dtype=%s stores the %d trainable parameters in half precision: AdamW updates smaller than "
            "the format's spacing (2^-8 of a weight for bf16) round away, so small-lr fine-tuning barely moves "
            "them. Use model.dtype=float32 with training.mixed_precision=bf16 (fp32 master weights, bf16 "
            "compute; docs/MODEL.md, Precision).", cfg.model.dtype, half)
    if cfg.model.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loaded.model.config.use_cache = False
    loaded.model.train()
    return loaded


@dataclass
class DataSplits:
    train: Sequence[Record]  # data.table.RecordTable: memory-mapped, decoded per access
    val: Sequence[Record]


def load_records(cfg: Config, accelerator=None) -> DataSplits:
    """Open (or synthesise, then open) the train/val JSONL files as memory-mapped Arrow tables
    (``data.table.open_records``: validated once per node, cached beside the file or under
    ``data.cache_dir``); reports are logged, never silent. The synthetic data and the caches are
    written once per node with the other ranks waiting (``training.setup.each_node_first``)."""
    d = cfg.data
    train_path, val_path = d.train_jsonl, d.val_jsonl
    if d.synthetic.enabled:
        with each_node_first(accelerator):
            train_path, val_path = make_shapes_dataset(
                d.synthetic.out_dir,
                d.synthetic.num_train,
                d.synthetic.num_val,
                image_size=d.synthetic.image_size,
                max_shapes=d.synthetic.max_shapes,
                seed=d.synthetic.seed,
                supersample=d.synthetic.supersample,
            )
        if d.synthetic.num_val == 0:  # the generator writes an empty val.jsonl; an empty file is an error
            val_path = None
    options = ReadOptions(image_root=d.image_root, coords=d.coords, object_order=d.object_order,
                          max_objects=d.max_objects, skip_invalid=d.skip_invalid, max_image_pixels=d.max_image_pixels)
    first = (lambda: each_node_first(accelerator)) if accelerator is not None else None

    def read(path):
        if not path:
            return []
        records, report = open_records(path, options, cache_root=d.cache_dir, main_process_first=first,
                                       procs=d.cache_build_procs)
        logger.info("data: %s", report.summary())
        require_records(report, d.image_root)  # skip_invalid skipped every line: the image root, most likely
        return records

    return DataSplits(train=read(train_path), val=read(val_path))


def make_encoder(cfg: Config, tokenizer, image_processor) -> ChatEncoder:
    return ChatEncoder(
        tokenizer,
        image_processor,
        prompt=cfg.data.prompt,
        system_prompt=cfg.data.system_prompt,
        min_pixels=cfg.data.min_pixels,
        max_pixels=cfg.data.max_pixels,
        max_image_pixels=cfg.data.max_image_pixels,
    )


def encoded(records: list[Record], encoder: ChatEncoder) -> EncodedRecords:
    return EncodedRecords(records, encoder)


def model_saver(accelerator, prepared_model, vlm, loaded: LoadedModel, *, adapter=None, base: str | None = None,
                coord_init: str = "sincos", dtype: torch.dtype | None = None,
                settings: CheckpointSettings | None = None):
    """``model_save_fn`` for ``training.checkpoint.save_training_state``: weights + tokenizer + image processor,
    and ``settings`` (``model.settings``: prompt, image budget, coord format, eval decoding) for inference.

    The state dict is gathered through ``accelerator.get_state_dict`` on every rank (FSDP / ZeRO-3
    shards need all of them); only the main process writes. Under an adapter (``adapter.enabled``) only
    the adapter tensors are written, with ``base`` (the checkpoint they apply to) in ``adapter.json``.
    Full weights are written in ``dtype`` (floating tensors), the dtype the model was loaded in
    (``model.dtype``): FSDP keeps fp32 master weights of a bf16 model, and the export for eval /
    inference stays the size of the loaded model.
    """

    def save(model_dir: Path) -> None:
        if adapter is not None and adapter.enabled:
            if accelerator.is_main_process:
                base_ref = os.path.abspath(base) if base and os.path.isdir(base) else base
                save_adapter(vlm, model_dir, adapter, base_ref, coord_init=coord_init)
                loaded.tokenizer.save_pretrained(str(model_dir))
                loaded.image_processor.save_pretrained(str(model_dir))
                if settings is not None:
                    write_settings(model_dir, settings)
            return
        full = accelerator.get_state_dict(prepared_model) or {}  # ZeRO-3 gathers to the main process only
        prefix = "vlm."
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k:
                      v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in full.items()}
        if accelerator.is_main_process:
            # save_original_format=False: write the parameter names as they are in memory (what
            # from_pretrained loads). Reverting the load-time renaming depends on how the model was
            # loaded: under ZeRO-3 (zero.Init loading) it inserted a spurious ".model." into the names.
            vlm.save_pretrained(str(model_dir), state_dict=state_dict, save_function=accelerator.save,
                                save_original_format=False)
            loaded.tokenizer.save_pretrained(str(model_dir))
            loaded.image_processor.save_pretrained(str(model_dir))
            if settings is not None:
                write_settings(model_dir, settings)

    return save


def run_eval(cfg: Config, *, accelerator, vlm, loaded: LoadedModel, encoder: ChatEncoder, val: list[Record], run_dir: Path,
             step: int, backend: GenerationBackend) -> dict[str, Any]:
    """In-loop rollout eval on the validation records (docs/EVAL.md); returns ``eval/rollout/*`` metrics.

    ``backend``: the run's ``rollout.backends.GenerationBackend``; eval generates with the same
    engine, greedy, ``eval.batch_size`` prompts per call (``derive``).
    """
    if not val:
        return {}
    records = val if cfg.eval.max_samples is None else val[: cfg.eval.max_samples]
    rm = cfg.rollout_matching
    was_training = vlm.training
    with torch.no_grad(), accelerator.autocast():  # generate in the training precision
        metrics = run_rollout_eval(
            vlm,
            loaded.tokenizer,
            loaded.coord_vocab,
            encoder,
            records,
            backend=backend.derive(temperature=0.0, batch_size=cfg.eval.batch_size),
            matching=rm.matching,
            eval_detection=rm.eval_detection,
            eval_cfg=cfg.eval,
            lvis_lists=read_lvis_lists(cfg.data.val_jsonl) if cfg.data.val_jsonl else None,
            out_dir=run_dir / "eval" / f"step_{step}",
            accelerator=accelerator,
            step=step,
            progress=True,
        )
    vlm.train(was_training)
    return metrics


def rollout_backend_for(cfg: Config, run: RunContext, s: TrainingSetup) -> GenerationBackend:
    """The run's generation backend (``rollout_matching.backend``), built on first use and kept on ``s``."""
    if s.rollout_backend is None:
        s.rollout_backend = make_generation_backend(cfg.rollout_matching, s.vlm, s.loaded.tokenizer, encoder=s.encoder,
                                                    work_dir=run.run_dir)
        # a stop signal ends a running Channel-B generate call at the next token (hf backend; the step is
        # dropped at the next micro-step boundary anyway); in-loop eval (a derived backend) runs to its end
        s.rollout_backend.abandon = lambda: s.interrupt.requested
    return s.rollout_backend


def batch_metrics(batch: PackedBatch) -> dict[str, float]:
    """Token and packing counters of one micro-batch (docs/training/METRICS_CONTRACT.md names)."""
    return {
        "train/tokens_total": float(batch.num_tokens),
        "train/supervised_tokens_total": float((batch.token_types != IGNORE).sum()),
        "packing/segments_total": float(len(batch.segments)),
        "data/skipped_samples_total": float(len(batch.skipped)),
        "packing/fill_frac": batch.num_tokens / max(batch.input_ids.numel(), 1),
        "packing/_slots_den": float(batch.input_ids.numel()),  # step fill = Σ tokens / Σ slots (STEP_DERIVED)
    }


@dataclass
class StepStart:
    """What a micro-step changes that a checkpoint of the last completed optimizer step must not see:
    the data position and the RNG states at the start of the step (weights, optimizer and schedule
    change only at the step's end), and the Stage-2 router state."""

    data_state: dict
    rng_state: dict
    router_state: dict | None = None


@dataclass
class TrainingSetup:
    """Everything a recipe's loop touches, built by :func:`setup_training` in recipe order."""

    loaded: LoadedModel
    splits: DataSplits
    encoder: ChatEncoder
    dataset: PackedDataset
    model: torch.nn.Module  # accelerate-prepared TrainingWrapper: model(batch, strategy, channel) -> StepOutput
    vlm: torch.nn.Module  # the unwrapped Qwen3-VL model (generation, embeddings, LM head, save_pretrained)
    optimizer: torch.optim.Optimizer  # accelerate-wrapped
    scheduler: torch.optim.lr_scheduler.LRScheduler  # accelerate-wrapped
    coord_ids: torch.Tensor  # [1000] coord token ids on the accelerator device
    pad_id: int
    start_step: int
    resume_state: TrainerState | None  # set when resuming
    tracker: Tracker
    aggregator: MetricAggregator
    progress: TrainProgress
    save_model: Callable[[Path], None]  # model_save_fn for save_training_state
    guard: NonFiniteGuard
    interrupt: InterruptFlag
    # the state a checkpoint of the last completed optimizer step needs mid-step (begin_step)
    step_start: StepStart | None = None
    saved_step: int | None = None  # the optimizer step of the newest checkpoint this run wrote or resumed from
    # for rollouts and in-loop eval: Stage-2 sets it before its loop, Stage-1 gets one at its first
    # eval (rollout_backend_for); told of every optimizer step that changed the weights
    rollout_backend: GenerationBackend | None = None


def make_training_wrapper(cfg: Config, vlm: torch.nn.Module, coord_ids: torch.Tensor) -> TrainingWrapper:
    """The module ``accelerator.prepare`` wraps: forwards + objective pipeline of ``cfg.variant`` in one forward."""
    sab, rm = cfg.stage2_ab, cfg.rollout_matching
    decode_mode = {STAGE2_TWO_CHANNEL: sab.coord_decode_mode, STAGE2_ROLLOUT_ALIGNED: rm.coord_decode_mode}
    return TrainingWrapper(
        vlm, cfg.pipeline, coord_ids, coord_decode_mode=decode_mode.get(cfg.variant, "exp"),
        expectation=ExpectationConfig(n_iter=sab.n_softctx_iter, embed_mode=sab.coord_ctx_embed_mode,
                                      grad_mode=sab.softctx_grad_mode, temperature=sab.softctx_temperature,
                                      prefix_reuse=sab.prefix_reuse),
    )


def setup_training(cfg: Config, run: RunContext, *, desc: str) -> TrainingSetup:
    """Model (a resumed run loads the checkpoint's weights) -> data (static packing, sharded by rank)
    -> AdamW + schedule -> ``accelerator.prepare`` -> resume optimizer/scheduler/RNG/data position ->
    tracker, aggregator, progress bar."""
    with _released_on_error(run.lock):
        return _setup_training(cfg, run, desc=desc)


def _setup_training(cfg: Config, run: RunContext, *, desc: str) -> TrainingSetup:
    t, accelerator = cfg.training, run.accelerator
    tracker = make_tracker(cfg, run)  # before the model: a wandb set-up error costs seconds, not a model load
    resume_model_dir = run.resume_dir / "model" if run.resume_dir else None
    if cfg.model.adapter.type != "none":  # the base comes from the config; the checkpoint holds the adapter
        base = resolve_checkpoint(cfg, accelerator=accelerator)
        loaded = load_model(cfg, base, adapter_weights=resume_model_dir)
    else:
        base = resolve_checkpoint(cfg, resume_model_dir=resume_model_dir, accelerator=accelerator)
        loaded = load_model(cfg, base)
    splits = load_records(cfg, accelerator)
    encoder = make_encoder(cfg, loaded.tokenizer, loaded.image_processor)
    dataset = make_train_dataset(cfg, encoded(splits.train, encoder), accelerator)

    coord_ids = loaded.coord_vocab.ids.to(accelerator.device)
    loaded_dtype = next(loaded.model.parameters()).dtype  # FSDP mixed precision upcasts to fp32 masters in prepare
    model = make_training_wrapper(cfg, loaded.model, coord_ids)
    # language_model first: train/lr logs the first group's lr
    lr_mult = {part: getattr(t.lr_mult, part) for part in PARTS}
    optimizer = build_optimizer(model, t.lr, t.weight_decay, t.adam_betas, t.adam_eps,
                                lr_mult=lr_mult, parts=param_parts(model))
    scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, t.warmup_ratio, t.max_steps, t.min_lr_ratio)
    configure_engine(accelerator, t.batch_size)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    register_direct_weights(accelerator, accelerator.unwrap_model(model))
    vlm = accelerator.unwrap_model(model).vlm

    start_step, state = 0, None
    if run.resume_dir is not None:
        state = load_training_state(run.resume_dir, optimizer, scheduler, accelerator=accelerator)
        dataset.load_state_dict(state.data_state)
        start_step = state.step
        run.logger.info("resumed from %s at step %d", run.resume_dir, start_step)
    model.train()
    return TrainingSetup(
        loaded=loaded, splits=splits, encoder=encoder, dataset=dataset, model=model, vlm=vlm,
        optimizer=optimizer, scheduler=scheduler, coord_ids=coord_ids,
        pad_id=loaded.tokenizer.pad_token_id, start_step=start_step, resume_state=state,
        tracker=tracker, aggregator=MetricAggregator(accelerator),
        progress=TrainProgress(t.max_steps, start_step, accelerator.is_main_process, cfg.run.log_every, desc=desc),
        save_model=model_saver(accelerator, model, vlm, loaded, adapter=spec_from_config(cfg.model.adapter), base=base,
                               coord_init=cfg.model.coord_tokens.init, dtype=loaded_dtype,
                               settings=settings_of(cfg)),
        guard=NonFiniteGuard(t.max_consecutive_nonfinite),
        interrupt=InterruptFlag(t.save_on_interrupt, on_sigusr1=t.on_sigusr1),
        saved_step=start_step if run.resume_dir is not None else None,
    )


def optimizer_step(run: RunContext, s: TrainingSetup, loss: torch.Tensor, max_grad_norm: float) -> dict[str, float]:
    """After a micro-step's backward, inside ``accelerator.accumulate``: on the sync micro-step clip, then step
    the optimizer only if the loss of every micro-step on every rank and the gradient norm are finite
    (``training.faults.NonFiniteGuard``), and step the schedule (it counts optimizer steps, skipped or not).
    The same cross-rank agreement tells every rank whether any rank received a signal (stop, or SIGUSR1's
    save-and-continue): the step's end acts on it. Returns this micro-step's optimizer metrics
    (``train/grad_norm`` on a clipped sync micro-step, else none)."""
    accelerator = run.accelerator
    metrics: dict[str, float] = {}
    s.guard.observe_loss(loss)
    if accelerator.sync_gradients:
        # The norm is needed for the finiteness check even without clipping (inf: grads scaled by 1).
        norm = accelerator.clip_grad_norm_(s.model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
        # DeepSpeed clipped (deepspeed_config.gradient_clipping) and stepped inside backward; it reports
        # its norm, or None, and then only the loss is checked here.
        if max_grad_norm > 0 and norm is not None:
            metrics["train/grad_norm"] = float(norm)
        finite, agreed = s.guard.step_is_finite(0.0 if norm is None else norm, other_flags=s.interrupt.flags(),
                                                accelerator=accelerator)
        s.interrupt.agree(agreed=agreed)
        # fp16: the GradScaler skips a non-finite step itself and must see it to lower its scale.
        if finite or accelerator.scaler is not None:
            s.optimizer.step()
            # An engine with its own copy of the weights (vLLM) pushes them before its next rollout;
            # a step skipped as non-finite, here or by the fp16 GradScaler, changed nothing.
            if s.rollout_backend is not None and finite and not getattr(s.optimizer, "step_was_skipped", False):
                s.rollout_backend.weights_changed()
        s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return metrics


def _stopping(cfg: Config, s: TrainingSetup, done: int) -> bool:
    """A stop signal was agreed during optimizer step ``done`` (the last step completes the run anyway)."""
    return s.interrupt.agreed and done < cfg.training.max_steps


def reduce_step(cfg: Config, s: TrainingSetup, done: int, *, started: float, tokens: int,
                step_values: dict | None = None) -> dict:
    """The metrics of optimizer step ``done`` (1-based), reduced over micro-steps and ranks, with the step
    values (lr, non-finite flag, ``step_values``); the progress bar moves. Every rank gets the same dict."""
    s.aggregator.add({"time/step_s": time.perf_counter() - started})
    metrics = s.aggregator.reduce({**(step_values or {}), "train/lr": s.scheduler.get_last_lr()[0],
                                   NONFINITE_METRIC: s.guard.record(done)})
    s.progress.update(done, loss=metrics.get("loss/total"), lr=metrics.get("train/lr"), tokens=tokens)
    return metrics


def eval_due(cfg: Config, s: TrainingSetup, done: int) -> bool:
    """``training.eval_every`` (and the last step), but never when a stop is waiting (it must not wait for an eval)."""
    return should(cfg.training.eval_every, done, cfg.training.max_steps) and not _stopping(cfg, s, done)


def step_eval(cfg: Config, run: RunContext, s: TrainingSetup, done: int) -> dict:
    """The in-loop eval of the weights after step ``done``: its ``eval/rollout/*`` metrics; the predictions go to
    ``eval/step_<done>/`` and the tracker's media."""
    with full_weights(s.model):  # sharded engines: gather once for the whole eval generation
        metrics = run_eval(cfg, accelerator=run.accelerator, vlm=s.vlm, loaded=s.loaded, encoder=s.encoder,
                           val=s.splits.val, run_dir=run.run_dir, step=done, backend=rollout_backend_for(cfg, run, s))
    predictions = run.run_dir / "eval" / f"step_{done}" / "predictions.jsonl"
    if predictions.is_file():
        s.tracker.log_eval_media(done, predictions)
    return metrics


def save_due(cfg: Config, s: TrainingSetup, done: int) -> bool:
    """``training.save_every`` (and the last step), or a signal agreed during the step (a stop, or SIGUSR1's
    save-and-continue)."""
    t = cfg.training
    return should(t.save_every, done, t.max_steps) or _stopping(cfg, s, done) or s.interrupt.save_agreed


def end_step(cfg: Config, run: RunContext, s: TrainingSetup, done: int) -> None:
    """After step ``done``'s log and save: too many non-finite steps in a row stop the run; an agreed stop
    signal stops it (its checkpoint saved by ``save_due``); SIGUSR1's save-and-continue goes on."""
    t = cfg.training
    if s.interrupt.save_agreed and not _stopping(cfg, s, done):
        run.logger.warning("checkpoint-%d saved on SIGUSR1 (training.on_sigusr1=save_and_continue); training "
                           "goes on", done)
    s.interrupt.save_agreed = False
    s.guard.check_streak(done, lambda: find_latest_checkpoint(run.run_dir), _nonfinite_fix(t))
    if _stopping(cfg, s, done):
        _stop(run, s, f"after optimizer step {done} of {t.max_steps}: checkpoint-{done} saved in {run.run_dir}")


def save_checkpoint(cfg: Config, run: RunContext, s: TrainingSetup, done: int, *, data_state: dict,
                    rng_state: dict | None = None, router_state: dict | None = None) -> None:
    """``checkpoint-<done>`` (every rank calls it), never from non-finite weights. ``rng_state``: this
    rank's RNG states to write (default: the current ones)."""
    t = cfg.training
    if not weights_finite(run.accelerator, s.model.parameters()):
        newest = find_latest_checkpoint(run.run_dir)
        raise NonFiniteError(
            f"step {done}: the model weights hold NaN/Inf values; checkpoint-{done} was not written "
            f"({'newest finite checkpoint: ' + str(newest) if newest else 'no checkpoint was written'}). "
            f"{_nonfinite_fix(t)}"
        )
    save_training_state(run.run_dir, accelerator=run.accelerator, model_save_fn=s.save_model,
                        optimizer=s.optimizer, scheduler=s.scheduler, step=done, data_state=data_state,
                        rng_state=rng_state, router_state=router_state, extra={"config": thaw(cfg.resolved)},
                        save_total_limit=t.save_total_limit)
    s.saved_step = done


def begin_step(s: TrainingSetup, *, router_state: dict | None = None) -> None:
    """Start of an optimizer step: remember what a checkpoint of the last completed step needs mid-step."""
    s.step_start = StepStart(s.dataset.state_dict(), get_rng_state(), router_state)


def micro_step_boundary(cfg: Config, run: RunContext, s: TrainingSetup, step: int) -> None:
    """Before each micro-step of optimizer step ``step`` (0-based; Stage-2 also before its rollouts):
    every rank agrees whether any rank received a signal (one small collective; none in a
    single-process run). On one, ``checkpoint-<step>`` (the last completed optimizer step: the
    weights, optimizer and schedule are unchanged since, the data position and RNG states come from
    :func:`begin_step`) is saved unless it exists already; a stop then drops the partial gradient
    accumulation (a resume replays the whole step) and raises :class:`TrainingInterrupted`, a
    save-and-continue goes on with the step. So a signal waits for one micro-step, not a whole step."""
    stop, asked = s.interrupt.agree(run.accelerator)
    if not (stop or asked):
        return
    saved = step > 0  # optimizer steps completed; 0: nothing to save yet
    if saved and s.saved_step != step:
        start = s.step_start
        save_checkpoint(cfg, run, s, step, data_state=start.data_state, rng_state=start.rng_state,
                        router_state=start.router_state)
    s.interrupt.save_agreed = False
    where = f"during optimizer step {step + 1} of {cfg.training.max_steps}"
    if not stop:
        run.logger.warning("%s: checkpoint-%d of the last completed optimizer step %s on SIGUSR1; training goes on",
                           where, step, "saved" if s.saved_step == step else "already there")
        return
    s.optimizer.zero_grad(set_to_none=True)  # the partial accumulation is dropped; a resume replays the step
    if not saved:
        _stop(run, s, f"{where}, before any optimizer step completed: nothing to save", resume=False)
    _stop(run, s, f"{where} (its partial gradient accumulation dropped; a resume replays it): checkpoint-{step} "
                  f"of the last completed optimizer step saved in {run.run_dir}")


def _stop(run: RunContext, s: TrainingSetup, what: str, *, resume: bool = True) -> None:
    signum = s.interrupt.signum or signal.SIGTERM  # ranks that got no signal stop like the one that did
    fix = ("to continue, rerun the same command with --set training.resume_from=latest" if resume
           else "to start again, rerun the same command with --set run.overwrite=true")
    message = f"stopped by {signal.Signals(signum).name} {what}; {fix}"
    run.logger.error(message)
    raise TrainingInterrupted(message, signum)


def _nonfinite_fix(t) -> str:
    """What to change when the loss or the weights go non-finite (the knobs of this config)."""
    clip = "" if t.max_grad_norm > 0 else ", set training.max_grad_norm (now 0: no clipping)"
    return f"Lower training.lr (now {t.lr:g}) or the loss weights{clip}, check the data"


def finish_run(run: RunContext, s: TrainingSetup) -> None:
    """Close the progress bar and the tracker, draw ``plots/metrics.png`` into the run dir (main process;
    a plotting failure only warns), release the run lock (also on error; the recipe then waits for every rank)."""
    try:
        s.progress.close()
        s.tracker.finish()
        s.interrupt.close()
        if run.accelerator.is_main_process:
            try:
                from training.plots import plot_run  # matplotlib: loaded only when a run ends

                plot_run(run.run_dir)
            except Exception as exc:  # noqa: BLE001 - the run's results are written; a plot must not fail it
                run.logger.warning("plots/metrics.png not written: %s", exc)
    finally:  # also when the launcher's SIGTERM stops this rank in the middle (another rank's user error)
        if run.lock is not None:
            run.lock.release()
