"""Checks that run before any weights load: every path the config names, and ``--dry-run``.

``check_paths(cfg)`` runs at the start of every training run, so a wrong model dir, data file,
image root or semantic encoder (``eval.semantic.model``, loaded here) fails in a second with the config key in the message (not after the model has
loaded). ``dry_run(cfg)`` is what ``train_stage1.py --dry-run`` / ``train_stage2.py --dry-run``
do: the config is already loaded and validated; then the paths, what the run needs from the machine
and the launch (``check_environment``: tracker credentials, processes vs devices, rollout backend,
half-precision autocast without CUDA), the tokenizer's coord tokens
(tokenizer and image processor only, no weights), every data record (contract and image files),
the resolved pipeline and the packing plan. It prints a summary and returns 0; a problem raises a
user error (``configs.errors``), which the CLI prints as one line and exits 2.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from configs.errors import ConfigError, UserError
from configs.types import Config
from core.vocab import STAGE2_TWO_CHANNEL


def check_model_path(cfg: Config) -> str:
    """``model.name_or_path`` checked (a local path must be a checkpoint dir); returns it."""
    from model.loading import check_checkpoint_path

    path = cfg.model.name_or_path
    if not path:
        raise ConfigError("model.name_or_path", "set a checkpoint dir / HF id, or model.tiny.enabled: true")
    try:
        check_checkpoint_path(path, "model.name_or_path")
    except UserError as exc:
        if Path(path).parts[:1] == ("runs",):  # the demo Stage-2 configs start from the Stage-1 demo's output
            raise UserError(f"{exc}; for the demo configs run the Stage-1 demo first "
                            "(python train_stage1.py --config configs/demo/stage1_shapes.yaml)") from exc
        raise
    return path


def adds_coord_tokens(cfg: Config) -> bool:
    """Whether a run adds missing coord tokens (logged with the init used): Stage-1 with
    ``model.coord_tokens.add_if_missing``. Stage-2 never does: it starts from a Stage-1 output, and
    fresh coord rows there are a wrong ``model.name_or_path`` (one error line names the fix)."""
    return cfg.variant == "stage1" and bool(cfg.model.coord_tokens.add_if_missing)


PLACEHOLDER = "/path/to/"


def check_paths(cfg: Config) -> None:
    """Every input path of the config exists: model dir, train/val JSONL, image root.

    All problems are reported at once (one line, each naming its key), so a config with several
    placeholders is fixed in one go.
    """
    problems: list[UserError] = []
    if not cfg.model.tiny.enabled:
        try:
            check_model_path(cfg)
        except UserError as exc:
            problems.append(exc)
    d = cfg.data
    if not d.synthetic.enabled:
        for key, value in (("data.train_jsonl", d.train_jsonl), ("data.val_jsonl", d.val_jsonl)):
            if value and not os.path.isfile(value):
                what = "is a directory, not a JSONL file" if os.path.isdir(value) else "no such file"
                problems.append(UserError(f"{key}={value!r}: {what} (a JSONL file of records, docs/DATA.md)"))
    if d.image_root and not os.path.isdir(d.image_root):
        problems.append(UserError(f"data.image_root={d.image_root!r}: no such directory (the base of relative image "
                                  "paths; null = each JSONL file's folder)"))
    try:  # the semantic encoder (eval.semantic.model) loads now: a missing package or model fails at start-up
        from eval.semantic import load_encoder

        load_encoder(getattr(getattr(cfg, "eval", None), "semantic", None))
    except UserError as exc:
        problems.append(exc)
    if len(problems) == 1 and PLACEHOLDER not in str(problems[0]):
        raise problems[0]
    if problems:
        hint = ""
        if PLACEHOLDER in " ".join(map(str, problems)):
            hint = (f"; replace the {PLACEHOLDER} placeholders in the config, or override them with "
                    "--set model.name_or_path=... --set data.train_jsonl=... (docs/FIRST_HOUR.md)")
        raise UserError(f"{len(problems)} path problem(s): " + "; ".join(map(str, problems)) + hint)


# Measured on a 2-core CPU box with the shipped real configs and a hub-layout checkpoint (issue #28).
CPU_AUTOCAST_SLOWDOWN = ("9.2-11.0 s per optimizer step vs 0.45-0.90 s with training.mixed_precision: no, "
                         "10-15x slower")


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cpusets)
    except AttributeError:
        return os.cpu_count() or 1


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wandb_credentials() -> str | None:
    """Where wandb would find an API key (its own order: environment, netrc, settings file), or None."""
    import configparser
    import netrc
    from urllib.parse import urlsplit

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return var
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in (Path(p).expanduser() for p in paths):
        try:
            if path.is_file() and netrc.netrc(str(path)).authenticators(host):
                return str(path)
        except (netrc.NetrcParseError, OSError):
            continue
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser() / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
    except configparser.Error:
        return None
    return str(settings) if parser.get("default", "api_key", fallback=None) else None


def check_environment(cfg: Config) -> list[str]:
    """What the config needs from this machine and launch, checked before any weight loads (``--dry-run``
    and the start of every run): the tracker's package and credentials, the launch's process count vs
    the devices, the rollout backend. Raises one user error listing every problem; returns warnings
    (half-precision autocast without CUDA)."""
    from training.tracking import wandb_settings

    problems, warnings = [], []
    tr = cfg.run.tracker
    if tr.backend == "wandb":
        mode = wandb_settings(mode=tr.mode)["mode"]
        if not _installed("wandb"):
            problems.append("run.tracker.backend=wandb: wandb is not installed (`pip install wandb`, or --set "
                            "run.tracker.backend=none)")
        elif mode == "online" and wandb_credentials() is None:
            problems.append(
                "run.tracker.mode=online (WANDB_MODE wins when set): no wandb API key (WANDB_API_KEY, `wandb login`'s "
                "~/.netrc entry, or wandb's settings file); log in, or run offline with --set "
                "run.tracker.mode=offline (or WANDB_MODE=offline; `wandb sync <run dir>/wandb` later), or --set "
                "run.tracker.backend=none")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus = _cuda_devices()
    if world > 1 and gpus and local > gpus:
        problems.append(f"the launch starts {local} processes on this machine but it has {gpus} CUDA GPU(s) "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): pass "
                        f"--num_processes {gpus} to accelerate launch (configs/accelerate/ddp.yaml starts 8)")
    elif world > 1 and not gpus and local > (cores := _cpu_cores()):
        problems.append(f"the launch starts {local} processes on this machine but it has no CUDA GPU and {cores} "
                        f"CPU core(s): CPU DDP (gloo) runs at most one process per core; pass --num_processes "
                        f"{cores} (or fewer) to accelerate launch (configs/accelerate/ddp.yaml starts 8)")
    rm = cfg.rollout_matching
    if rm.backend == "vllm":
        if not _installed("vllm"):
            problems.append("rollout_matching.backend=vllm: vllm is not installed (pip install -r "
                            "requirements-vllm.txt), or --set rollout_matching.backend=hf")
        elif not gpus:
            problems.append("rollout_matching.backend=vllm needs a CUDA GPU and this machine has none; --set "
                            "rollout_matching.backend=hf")
    if cfg.training.mixed_precision != "no" and not gpus:
        warnings.append(f"training.mixed_precision={cfg.training.mixed_precision} without a CUDA GPU: CPU autocast "
                        f"in half precision crawls (measured: {CPU_AUTOCAST_SLOWDOWN}); for a CPU run --set "
                        "training.mixed_precision=no")
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problem(s) with this machine or launch: " + "; ".join(problems))
    return warnings


def dry_run(cfg: Config, *, out=print, notes: Sequence[str] = ()) -> int:
    """Validate everything a run needs without loading weights; print the plan; return 0 (or raise).
    ``notes``: lines printed with the plan (the data settings taken from the checkpoint's saved settings)."""
    from data.encoding import EncodedRecords
    from data.packing import PackedDataset
    from data.table import cached_packing
    from model.loading import load_tokenizer_and_image_processor, require_coord_tokens
    from model.vocab import ensure_coord_tokens, has_any_coord_token
    from training.session import load_records, make_encoder, resolve_checkpoint
    from training.setup import setup_logging

    started = time.perf_counter()
    t = cfg.training
    setup_logging(None)  # stderr only: a dry run writes nothing into the run dir
    main = int(os.environ.get("RANK", "0")) == 0  # under a launcher the main process reports, once
    if main:
        out(f"dry run: {cfg.path} (variant {cfg.variant}); nothing is trained, no weights are loaded")
    check_paths(cfg)
    warnings = check_environment(cfg)  # tracker, launch vs devices, rollout backend; autocast warnings
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not main:  # the main process checks the rest
        return 0
    out(f"  run dir        {cfg.run.run_dir}")
    launch = (f"{world} processes" if world > 1 else
              "1 process (run the dry run under the same `accelerate launch ...` command to check the launch)")
    out(f"  launch         {launch}; tracker {cfg.run.tracker.backend}; rollouts {cfg.rollout_matching.backend}")
    for note in notes:  # the data settings taken from the checkpoint (training.session.with_checkpoint_settings)
        out(f"  settings       {note}")
    for warning in warnings:
        out(f"  WARNING        {warning}")

    source = resolve_checkpoint(cfg)  # the tiny model is built here when enabled (as a run would)
    tokenizer, image_processor = load_tokenizer_and_image_processor(source, key="model.name_or_path")
    if adds_coord_tokens(cfg) and not has_any_coord_token(tokenizer):
        vocab, _ = ensure_coord_tokens(tokenizer)  # in memory only, so the lengths below are the run's
        coords = f"missing; added at load with fresh rows (model.coord_tokens.init: {cfg.model.coord_tokens.init})"
    else:  # Stage-2 never adds them: it starts from a Stage-1 output
        vocab = require_coord_tokens(tokenizer, source, "model.name_or_path")
        coords = f"present (ids {vocab.first_id}..{vocab.end_id - 1})"
    out(f"  model          {source}: tokenizer {len(tokenizer)} entries, coord tokens {coords}")

    splits = load_records(cfg)  # the data reports go to the log (stderr)
    if not splits.train:
        raise ConfigError("data.train_jsonl", "no training records; the file has no valid line")
    encoder = make_encoder(cfg, tokenizer, image_processor)
    # the run's own length pass and packing plan (data.table.cached_packing): built here once, reused by the run
    lengths, rows = cached_packing(splits.train, encoder, t.max_length, t.packing, procs=cfg.data.cache_build_procs)
    dataset = PackedDataset(EncodedRecords(splits.train, encoder), t.max_length, t.batch_size, t.packing,
                            seed=cfg.run.seed, lengths=lengths, rows=rows, num_replicas=world, rank=0)
    fill = sum(lengths) / (len(dataset.rows) * t.max_length)
    per_epoch = len(dataset) / t.gradient_accumulation_steps  # optimizer steps per pass over the data
    out(f"  packing        {len(lengths)} samples (tokens min {min(lengths)} / mean {sum(lengths) / len(lengths):.0f} / "
        f"max {max(lengths)} of max_length {t.max_length}) -> {len(dataset.rows)} rows "
        f"(packing {'on' if t.packing else 'off'}, fill {fill:.1%})")
    out(f"  schedule       {len(dataset)} micro-batches per epoch per rank ({world} rank(s), batch_size {t.batch_size}, "
        f"grad accumulation {t.gradient_accumulation_steps}) -> {per_epoch:g} optimizer steps per epoch; "
        f"max_steps {t.max_steps} = {t.max_steps / per_epoch:.1f} epochs")
    pipe = cfg.pipeline
    for kind, specs in (("objective", pipe.objective), ("diagnostics", pipe.diagnostics)):
        names = ", ".join(f"{m.name}(w={m.weight:g}{', ch=' + ''.join(m.channels) if cfg.variant == STAGE2_TWO_CHANNEL else ''})"
                          for m in specs if m.enabled) or "none"
        out(f"  {kind:<14} {names}")
    out(f"  pipeline       source {pipe.source}, checksum {pipe.checksum[:16]}")
    out(f"dry run OK in {time.perf_counter() - started:.1f}s")
    return 0
