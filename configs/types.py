"""The typed config tree: frozen dataclasses, one per map in docs/CONFIG.md, and the one declaration of every key.

Attribute access follows the YAML key tree exactly (``cfg.training.lr``,
``cfg.stage2_ab.schedule.b_ratio``). Each field is declared with ``configs.declare.knob``
(type from the annotation, default, allowed values or range, one-line doc), ``section`` (a
nested map) or ``alias`` (a flat objective knob that takes type and range from the pipeline
module key it feeds, ``configs/modules.py``). The JSON Schema the loader validates with, the
defaults it fills, ``configs.pipeline``'s flat-knob table and docs/CONFIG.md are generated from
these fields, so each fact is written here once.

Lists become tuples and free-form maps (pipeline lists, module configs) become
:class:`FrozenDict`, so nothing reachable from a :class:`Config` can be mutated.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from configs.declare import OMITTED, REQUIRED, alias, knob, section
from configs.modules import BBoxGeoConfig, CoordRegConfig, TokenCEWeights
from core.vocab import CHANNELS, DECODE_MODES, EMBED_MODES, GRAD_MODES, STAGE2_VARIANTS

if TYPE_CHECKING:  # configs.pipeline builds on these declarations
    from configs.pipeline import ResolvedPipeline

# ---------------------------------------------------------------- immutable containers


class FrozenDict(dict):
    """A ``dict`` that refuses mutation (still ``isinstance(x, dict)`` and JSON-serialisable).

    ``copy.deepcopy`` returns a plain, mutable deep copy (see :func:`thaw`), which
    is what callers that need to edit a config tree want.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("config maps are read-only; use copy.deepcopy(...) or configs.thaw(...) for a mutable copy")

    __setitem__ = __delitem__ = __ior__ = _readonly  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict) -> dict:
        return {k: copy.deepcopy(v, memo) for k, v in self.items()}

    def __copy__(self) -> dict:
        return dict(self)

    def __reduce__(self):  # pickling (DataLoader workers, multiprocessing) keeps it frozen
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def freeze(obj: Any) -> Any:
    """Deep-convert dicts to :class:`FrozenDict` and lists to tuples."""
    if isinstance(obj, Mapping):
        return FrozenDict({k: freeze(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return tuple(freeze(v) for v in obj)
    return obj


def thaw(obj: Any) -> Any:
    """Deep-convert mappings to plain dicts and tuples to lists (inverse of :func:`freeze`)."""
    if isinstance(obj, Mapping):
        return {k: thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [thaw(v) for v in obj]
    return obj


# ---------------------------------------------------------------- run

RUN_NAME_PATTERN = r"^[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*$"  # no '/', no '..', no leading dot: the run dir stays in output_dir


@dataclass(frozen=True)
class TrackerConfig:
    backend: str = knob("none", "metrics.jsonl is always written", enum=("none", "wandb"))
    mode: str = knob("offline", "WANDB_MODE in the environment wins (WANDB_MODE=offline runs offline whatever this "
                     "says); a failing wandb.init stops before the model loads", enum=("online", "offline"))
    project: str = knob("coordexp", "WANDB_PROJECT in the environment wins; likewise WANDB_ENTITY, WANDB_NAME "
                        "(run name) and WANDB_RUN_ID. wandb's files always go to <run dir>/wandb", min_length=1)
    entity: str | None = knob(None, "wandb entity (WANDB_ENTITY wins)")
    tags: tuple[str, ...] = knob((), "wandb run tags")


@dataclass(frozen=True)
class RunConfig:
    """Run identity, output location, seed and experiment tracking."""

    name: str = knob("run", "run dir = <output_dir>/<name>: a plain directory name (letters, digits and . _ - + = , @; "
                     "not starting with a dot), never a path", min_length=1, max_length=200, pattern=RUN_NAME_PATTERN)
    output_dir: str = knob("runs", "parent of the run dir", min_length=1)
    seed: int = knob(42, "the run's random seed (accelerate set_seed, packing order, adapter init)", minimum=0)
    log_every: int = knob(
        1, "optimizer steps between progress-bar refreshes on a terminal; off a terminal (stderr to a file, e.g. a "
        "cluster log) one plain line `stage1 step N/T loss=... lr=... tok/s=... elapsed=...s` every log_every steps "
        "instead of bar frames; metrics.jsonl gets every step", minimum=1)
    overwrite: bool = knob(
        False, "a run dir that already holds a run (a checkpoint, or a logged step in metrics.jsonl) is refused unless "
        "resuming (training.resume_from); true deletes it first. A run that died before its first logged step holds "
        "nothing: the plain rerun is accepted (docs/RUN_DIR.md). A run dir locked by a live run (run.lock, "
        "docs/RELIABILITY.md) is refused either way")
    tracker: TrackerConfig = section(TrackerConfig, "experiment tracker")

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where checkpoints, metrics.jsonl and config.resolved.yaml go."""
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class TinyModelConfig:
    enabled: bool = knob(False, "build the tiny model into `dir` if absent, then load it like a real checkpoint")
    dir: str = knob("runs/tiny_qwen3vl", "where the tiny model is built and loaded from", min_length=1)
    seed: int = knob(0, "seed of the random weights", minimum=0)
    hidden: int = knob(64, "text decoder width (4 heads; must divide into head_dim >= 6; MLP 2 x hidden)", minimum=8)
    layers: int = knob(2, "text decoder layers", minimum=1)
    vision_hidden: int = knob(32, "vision tower width (2 heads)", minimum=8)
    vision_depth: int = knob(2, "vision tower blocks", minimum=1)
    max_pixels: int = knob(4096, "image budget of the saved image processor (resized area in pixels): 4096 = 64x64 "
                           "= 4 image tokens, 16384 = 128x128 = 16", minimum=1024)
    init_std: float = knob(0.02, "std of the random initial weights (HF initializer_range; 0.02 as Qwen3-VL; the "
                           "demo uses 0.1: at width 64 it shortens the plateau before the model reads the image)",
                           exclusive_minimum=0)
    coord_init: str = knob("hf", "coord-token rows of the built model: hf = random like every other row; sincos / "
                           "mean / random = as the loader initialises the coord rows it adds to a real checkpoint "
                           "(model.coord_tokens.init)", enum=("hf", "sincos", "mean", "random"))


@dataclass(frozen=True)
class CoordTokensConfig:
    add_if_missing: bool = knob(True, "Stage-1: add the 1000 coord tokens to the tokenizer and embeddings when the "
                                "checkpoint lacks them (logged with the init); Stage-2 never adds them and refuses "
                                "such a checkpoint")
    init: str = knob("sincos", "initialisation of new coord-token rows", enum=("sincos", "mean", "random"))


@dataclass(frozen=True)
class FreezeConfig:
    vision: bool = knob(False, "freeze the vision tower (without its mergers)")
    merger: bool = knob(False, "freeze the patch merger and deepstack mergers")
    language_model: bool = knob(False, "freeze the text decoder, embeddings and LM head")


@dataclass(frozen=True)
class LoraConfig:
    r: int = knob(16, "LoRA rank", minimum=1)
    alpha: float = knob(32, "update scale alpha / r", exclusive_minimum=0)
    dropout: float = knob(0.05, "dropout on the LoRA input", minimum=0, exclusive_maximum=1)
    target_modules: tuple[str, ...] = knob(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "leaf names of the language model's linear layers to adapt", items={"minLength": 1}, min_items=1,
        unique_items=True)
    vision: bool = knob(False, "also adapt the vision blocks (qkv, proj, linear_fc1, linear_fc2)")
    merger: bool = knob(False, "also adapt the patch merger and deepstack mergers")


@dataclass(frozen=True)
class AdapterConfig:
    type: str = knob("none", "none: train the weights model.freeze leaves trainable; lora: LoRA pairs (+ coord "
                     "offsets when coord_offset); coord_offset: only the offsets of the 1000 coord rows",
                     enum=("none", "lora", "coord_offset"))
    coord_offset: bool = knob(True, "with type lora: also train offsets of the 1000 coord rows of the embedding "
                              "table and LM head")
    lora: LoraConfig = section(LoraConfig, "LoRA settings (type lora)")


@dataclass(frozen=True)
class ModelConfig:
    """Which Qwen3-VL checkpoint to load and how."""

    name_or_path: str | None = knob(None, "HF id or local dir of a Qwen3-VL checkpoint; exactly one of this and "
                                    "model.tiny.enabled", min_length=1)
    tiny: TinyModelConfig = section(TinyModelConfig, "built-in tiny random Qwen3-VL (tests, demo)")
    dtype: str = knob("float32", "parameter storage (master weights); compute precision is "
                      "training.mixed_precision. Training: keep float32 (docs/MODEL.md, Precision); fp16 params need "
                      "mixed_precision no, bfloat16 params refuse fp16; half params with trainable weights log a "
                      "warning", enum=("float32", "bfloat16", "float16"))
    attn_implementation: str = knob("auto", "auto: flash_attention_2 when flash-attn is importable and CUDA is "
                                    "present, else sdpa_packed; the choice is logged. sdpa_packed: SDPA per packed "
                                    "sample (same result as sdpa's block mask, faster on packed rows; measurements in docs/MODEL.md)",
                                    enum=("auto", "sdpa_packed", "sdpa", "eager", "flash_attention_2"))
    coord_tokens: CoordTokensConfig = section(CoordTokensConfig, "the 1000 coord tokens <|coord_0|>..<|coord_999|>")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward (also the way to turn it on "
                                        "under FSDP)")
    freeze: FreezeConfig = section(FreezeConfig, "parts of the VLM that get no gradient (adapter.type none)")
    adapter: AdapterConfig = section(AdapterConfig, "parameter-efficient training (docs/MODEL.md \"Adapters\"): "
                                     "under lora or coord_offset the whole base model is frozen and model.freeze is "
                                     "not read")


# ---------------------------------------------------------------- data

DEFAULT_PROMPT = (
    "Detect every object in the image. Answer with one line of JSON: {\"objects\": [{\"desc\": \"<what it is>\", "
    "\"bbox_2d\": [x1, y1, x2, y2]}, ...]}, each corner written as a coordinate token, objects ordered top to "
    "bottom then left to right."
)


@dataclass(frozen=True)
class SyntheticDataConfig:
    enabled: bool = knob(False, "generate the shapes dataset into out_dir if absent")
    out_dir: str = knob("runs/shapes", "where the generated train/val JSONL and images go", min_length=1)
    num_train: int = knob(64, "training images", minimum=1)
    num_val: int = knob(16, "validation images", minimum=0)
    image_size: int = knob(64, "image side, pixels (square)", minimum=8)
    max_shapes: int = knob(3, "shapes per image at most", minimum=0)
    seed: int = knob(0, "generator seed", minimum=0)
    supersample: int = knob(1, "draw at this many times image_size and area-average down: box edges on 1/S-pixel "
                               "positions, so more of the 1000 coord bins occur (all once S >= 1000/image_size)",
                            minimum=1, maximum=16)


@dataclass(frozen=True)
class DataConfig:
    """Training / validation JSONL, image location, coordinate convention, prompt, synthetic shapes."""

    train_jsonl: str | None = knob(None, "training records (docs/DATA.md); required unless data.synthetic.enabled "
                                   "(cross-field check in the loader)", min_length=1)
    val_jsonl: str | None = knob(None, "validation records for in-loop eval", min_length=1)
    image_root: str | None = knob(None, "image paths are relative to this, else to the JSONL file", min_length=1)
    coords: str = knob("pixel", "pixel: [x1,y1,x2,y2] in original-image pixels; bins: already 0..999. A box of 4 "
                       "coord tokens (\"<|coord_k|>\") is bins in either mode", enum=("pixel", "bins"))
    object_order: str = knob("yx", "yx: top-to-bottom then left-to-right by (y1, x1); none: file order",
                             enum=("yx", "none"))
    max_objects: int | None = knob(None, "keep the first N objects of each record (after object_order; counted and reported); null = all", minimum=1)
    min_pixels: int | None = knob(None, "image processor lower bound of the resized image area, pixels; null = the processor's",
                                  minimum=1)
    max_pixels: int | None = knob(None, "image processor upper bound of the resized image area, pixels; null = the processor's",
                                  minimum=1)
    prompt: str = knob(DEFAULT_PROMPT, "user prompt of every sample (default: the detection prompt)", min_length=1)
    system_prompt: str | None = knob(None, "system message; null = none")
    skip_invalid: bool = knob(False, "skip invalid JSONL lines (not UTF-8, not JSON, contract violations, an image "
                              "whose header does not open; counted per reason, reported) instead of failing, and skip "
                              "(and count, data/skipped_samples_total) a sample whose image fails to decode during "
                              "training; an empty file always fails (docs/DATA.md)")
    max_image_pixels: int = knob(100_000_000, "largest image (width x height) that is opened; a larger one is an "
                                 "error naming its file:line (or skipped with data.skip_invalid)", minimum=1)
    cache_dir: str | None = knob(None, "where each JSONL's validated Arrow copy, token lengths and packing plan are "
                                 "cached (<cache_dir>/.coordexp_cache/<key>/); null: beside the JSONL (docs/DATA.md)")
    cache_build_procs: int = knob(0, "processes that build a new record cache (validation in parts of the file, "
                                  "token lengths in batches; once per dataset and node): 0 = every CPU the process "
                                  "may use, 1 = in the training process", minimum=0)
    num_workers: int = knob(0, "DataLoader worker processes that decode images, run the image processor and collate "
                            "training micro-batches ahead of the step (0 = in the training process)", minimum=0)
    synthetic: SyntheticDataConfig = section(SyntheticDataConfig, "generated shapes dataset (demo, tests)")


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class LrMultConfig:
    vision: float = knob(1.0, "vision tower without its mergers", exclusive_minimum=0)
    merger: float = knob(1.0, "patch merger + deepstack mergers (vision -> LM projection)", exclusive_minimum=0)
    language_model: float = knob(1.0, "text decoder, embeddings (incl. coord rows), LM head; train/lr logs this "
                                 "group's lr", exclusive_minimum=0)


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation loop shared by Stage-1 and Stage-2."""

    max_steps: int = knob(100, "optimizer steps", minimum=1)
    batch_size: int = knob(1, "packed rows (packing on) or samples (off) per micro-step and rank", minimum=1)
    max_length: int = knob(4096, "tokens per packed row / per sample", minimum=16)
    packing: bool = knob(True, "pack several samples into one row of max_length tokens (exact: same logits)")
    gradient_accumulation_steps: int = knob(1, "micro-steps per optimizer step", minimum=1)
    lr: float = knob(1e-05, "peak learning rate", exclusive_minimum=0)
    lr_mult: LrMultConfig = section(LrMultConfig, "peak lr of each part of the VLM as a multiple of training.lr "
                                    "(> 0; parts as in model.freeze)")
    weight_decay: float = knob(0.0, "AdamW weight decay of the decay parameter groups (the no-decay groups never decay)", minimum=0)
    adam_betas: tuple[float, float] = knob((0.9, 0.999), "AdamW betas, each in [0, 1)",
                                           items={"minimum": 0, "exclusiveMaximum": 1})
    adam_eps: float = knob(1e-08, "AdamW epsilon", exclusive_minimum=0)
    lr_scheduler: str = knob("cosine", "decay after warmup", enum=("cosine", "linear", "constant"))
    warmup_steps: int = knob(0, "linear warmup steps", minimum=0)
    warmup_ratio: float = knob(0.0, "fraction of max_steps, [0, 1); use this or warmup_steps, not both",
                               minimum=0, exclusive_maximum=1)
    min_lr_ratio: float = knob(0.0, "[0, 1]: floor of the decayed lr as a fraction of lr", minimum=0, maximum=1)
    max_grad_norm: float = knob(1.0, "gradient clipping norm; 0 disables clipping", minimum=0)
    max_consecutive_nonfinite: int = knob(
        10, "a step whose loss (any micro-step, any rank) or grad norm is NaN/Inf skips the optimizer update "
        "(train/nonfinite_skipped_total); this many skipped steps in a row stop the run with an error "
        "(docs/RELIABILITY.md)", minimum=1)
    mixed_precision: str = knob("no", "autocast of forwards and losses over model.dtype parameters (bf16: the real "
                                "recipes)", enum=("no", "bf16", "fp16"))
    save_every: int = knob(0, "optimizer steps between checkpoints; 0 = only at the end", minimum=0)
    save_total_limit: int | None = knob(None, "keep the newest N checkpoints (older ones go only after a save "
                                        "completes); null = all", minimum=1)
    save_on_interrupt: bool = knob(
        True, "SIGTERM / SIGINT (and SIGUSR1, see on_sigusr1) drop the current optimizer step's partial gradient "
        "accumulation at the next micro-step (every rank agrees), save a checkpoint of the last completed optimizer "
        "step and stop with exit 128 + signal (143 / 130 / 138); false: the default signal behaviour (immediate exit, "
        "no checkpoint; docs/RELIABILITY.md)")
    on_sigusr1: str = knob(
        "stop", "SIGUSR1 (a scheduler's early warning): stop like SIGTERM, or save_and_continue: save a checkpoint of "
        "the last completed optimizer step at the next micro-step and keep training (needs save_on_interrupt)",
        enum=("stop", "save_and_continue"))
    collective_timeout_s: int = knob(
        1800, "seconds a cross-rank collective may wait (a frozen or lost rank) before the run fails instead of "
        "hanging (accelerate InitProcessGroupKwargs); multi-process runs only", minimum=1)
    eval_every: int = knob(0, "optimizer steps between in-loop evals; 0 = only at the end", minimum=0)
    resume_from: str | None = knob(None, "checkpoint dir, or \"latest\" (newest checkpoint in the run dir)",
                                   min_length=1)


# ---------------------------------------------------------------- custom


@dataclass(frozen=True)
class CoordSoftCEW1Config:
    enabled: bool = knob(False, "-> the coord_reg entry's enabled key (soft_ce_weight and w1_weight below)",
                         maps_to="coord_reg.enabled")
    ce_weight: float = alias(CoordRegConfig, "coord_ce_weight", "-> coord_reg.coord_ce_weight")
    soft_ce_weight: float = alias(CoordRegConfig, "soft_ce_weight", "-> coord_reg.soft_ce_weight", default=1.0)
    w1_weight: float = alias(CoordRegConfig, "w1_weight", "-> coord_reg.w1_weight", default=1.0)
    gate_weight: float = alias(CoordRegConfig, "coord_gate_weight", "-> coord_reg.coord_gate_weight", default=1.0)
    temperature: float = alias(CoordRegConfig, "temperature", "-> coord_reg.temperature")
    target_sigma: float = alias(CoordRegConfig, "target_sigma", "-> coord_reg.target_sigma: Gaussian target "
                                "width in bins")
    target_truncate: int | None = alias(CoordRegConfig, "target_truncate", "-> coord_reg.target_truncate: zero "
                                        "the target beyond this many bins from the GT bin; null = no truncation")


@dataclass(frozen=True)
class CustomConfig:
    """Trainer variant and the coord soft-CE / W1 regulariser knobs (docs/training/METRICS_LOSSES.md)."""

    trainer_variant: str | None = knob(None, "stage2_two_channel or stage2_rollout_aligned for train_stage2.py; "
                                       "null = Stage-1 (train_stage1.py)",
                                       enum=(*STAGE2_VARIANTS, None))
    coord_soft_ce_w1: CoordSoftCEW1Config = section(
        CoordSoftCEW1Config, "flat block that maps onto coord_reg when no pipeline is written "
        "(docs/training/METRICS_LOSSES.md)")
    plugins: tuple[str, ...] = knob((), "Python files (relative to the working directory) or module names imported "
                                    "before the pipeline is resolved: each registers its own pipeline modules "
                                    "(docs/ARCHITECTURE.md, a new module in one file)", items={"minLength": 1})


# ---------------------------------------------------------------- objective surfaces
# ``pipeline`` is the user's list exactly as written (frozen), or None when omitted;
# the resolved module lists with defaults and checksum are on ``Config.pipeline``.



@dataclass(frozen=True)
class PipelineEntry:
    """One module entry of an objective pipeline (schema only: ``configs.pipeline`` resolves entries)."""

    name: str = knob(REQUIRED, "the module to run (pipeline.registry)", min_length=1)
    enabled: bool = knob(True, "false keeps the entry but runs nothing")
    weight: float = knob(1.0, "multiplies the module loss (objective modules only)", minimum=0)
    channels: tuple[str, ...] = knob(CHANNELS, "Stage-2 Two-Channel only: the channels the module runs in",
                                     items={"enum": list(CHANNELS)}, unique_items=True, min_items=1)
    config: Mapping[str, Any] = knob(OMITTED, "module knobs, declared per module in configs/modules.py "
                                     "(listed under \"Pipeline module `config` keys\")", schema={"type": "object", "default": {}})


@dataclass(frozen=True)
class PipelineDecl:
    """An objective pipeline: ordered objective and diagnostics module lists (docs/training/PIPELINE.md)."""

    objective: tuple[PipelineEntry, ...] = knob(OMITTED, "objective modules (return a loss), in run order")
    diagnostics: tuple[PipelineEntry, ...] = knob(OMITTED, "diagnostics modules (metrics only), in run order")


def pipeline_knob(doc: str) -> Any:
    return knob(None, doc, schema={"$ref": "pipeline.json"})


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 objective (train_stage1.py)."""

    pipeline: Mapping[str, Any] | None = pipeline_knob(
        "optional; omitted = default Stage-1 manifest (docs/training/METRICS_LOSSES.md)")


@dataclass(frozen=True)
class ScheduleConfig:
    b_ratio: float = knob(0.2, "target fraction of Rollout (Channel-B) optimizer steps", minimum=0, maximum=1)


@dataclass(frozen=True)
class ChannelBConfig:
    drop_invalid_struct_ce_multiplier: float = alias(
        TokenCEWeights, "rollout_drop_invalid_struct_ce_multiplier",
        "flat knob -> token_ce.rollout_drop_invalid_struct_ce_multiplier: struct weights of a rollout that dropped "
        "an invalid object")


@dataclass(frozen=True)
class FallbackConfig:
    on_rollout_failure: str = knob("fail", "what a scheduled Rollout step does when it cannot be built",
                                   enum=("fail", "expectation"))


@dataclass(frozen=True)
class Stage2ABConfig:
    """Stage-2 Two-Channel (custom.trainer_variant: stage2_two_channel), docs/training/STAGE2_RUNBOOK.md.

    The flat objective knobs (``*_weight``, ``coord_huber_delta``, ``channel_b``) are read only
    without a pipeline; see "Default manifests" in docs/training/METRICS_LOSSES.md.
    """

    schedule: ScheduleConfig = section(ScheduleConfig, "which optimizer steps are Rollout steps")
    n_softctx_iter: int = knob(2, "full forwards per Expectation step (1 = plain teacher forcing)", minimum=1)
    softctx_grad_mode: str = knob("unroll", "unroll: backprop through every soft-context forward; em_detach: detach the coord logits that build the next context",
                                  enum=GRAD_MODES)
    softctx_temperature: float = knob(1.0, "temperature of the coord distribution that builds the soft context embeddings", exclusive_minimum=0)
    coord_ctx_embed_mode: str = knob("st", "how a coord distribution becomes the next forward's input embedding; hard is for "
                                     "debugging only", enum=EMBED_MODES)
    prefix_reuse: bool = knob(True, "Channel-A forwards 2..N recompute only each sample from its first coord slot on "
                              "and reuse forward 1's keys/values before it (same losses and gradients as full "
                              "forwards); full recomputation where the attention kernel or the batch does not allow "
                              "it (docs/training/STAGE2_RUNBOOK.md, Prefix reuse)")
    coord_decode_mode: str = knob("exp", "coord decode of the geometry losses", enum=DECODE_MODES)
    desc_ce_weight: float = alias(TokenCEWeights, "desc_ce_weight", "flat knob -> token_ce.desc_ce_weight and "
                                  "token_ce.rollout_fn_desc_weight")
    fmt_struct_ce_weight: float = alias(TokenCEWeights, "self_context_struct_ce_weight",
                                        "flat knob -> token_ce.self_context_struct_ce_weight")
    bbox_smoothl1_weight: float = alias(BBoxGeoConfig, "smoothl1_weight", "flat knob -> bbox_geo.smoothl1_weight")
    bbox_ciou_weight: float = alias(BBoxGeoConfig, "ciou_weight", "flat knob -> bbox_geo.ciou_weight")
    coord_ce_weight: float = alias(CoordRegConfig, "coord_ce_weight", "flat knob -> coord_reg.coord_ce_weight")
    coord_el1_weight: float = alias(CoordRegConfig, "coord_el1_weight", "flat knob -> coord_reg.coord_el1_weight")
    coord_ehuber_weight: float = alias(CoordRegConfig, "coord_ehuber_weight",
                                       "flat knob -> coord_reg.coord_ehuber_weight")
    coord_huber_delta: float = alias(CoordRegConfig, "coord_huber_delta",
                                     "flat knob -> coord_reg.coord_huber_delta (fraction units)")
    coord_entropy_weight: float = alias(CoordRegConfig, "coord_entropy_weight",
                                        "flat knob -> coord_reg.coord_entropy_weight")
    # On by default (unlike the module default 0): without a term on the full-vocabulary mass at
    # coord slots, text CE leaks mass there and expectation-based geometry flattens the coord
    # distribution until greedy decoding writes text where a coordinate belongs.
    coord_gate_weight: float = alias(CoordRegConfig, "coord_gate_weight", "flat knob -> coord_reg.coord_gate_weight; "
                                     "on by default so coord slots keep their mass on coord tokens "
                                     "(docs/training/STAGE2_RUNBOOK.md)", default=1.0)
    text_gate_weight: float = alias(CoordRegConfig, "text_gate_weight", "flat knob -> coord_reg.text_gate_weight")
    channel_b: ChannelBConfig = section(ChannelBConfig, "Channel-B (Rollout step) knobs")
    fallback: FallbackConfig = section(FallbackConfig, "what happens when a Rollout step fails")
    pipeline: Mapping[str, Any] | None = pipeline_knob(
        "optional; omitted = default Two-Channel manifest from the flat knobs (docs/training/METRICS_LOSSES.md)")


@dataclass(frozen=True)
class DecodingConfig:
    temperature: float = knob(0.0, "sampling temperature; 0.0 = greedy", minimum=0)
    top_p: float = knob(1.0, "nucleus sampling mass", exclusive_minimum=0, maximum=1)
    top_k: int = knob(0, "top-k sampling; 0 = off", minimum=0)
    max_new_tokens: int = knob(512, "generated tokens per rollout at most", minimum=1)
    batch_size: int | str = knob(8, "prompts per generate call, or auto (from the free GPU memory, docs/ROLLOUT.md "
                                 "\"Generation backends\"; 8 off CUDA)",
                                 schema={"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]})
    seed: int = knob(0, "sampling seed", minimum=0)
    coord_pick: str = knob("argmax", "how a generated coord token is chosen: argmax = the decoder's own choice "
                           "(greedy argmax or the sampled token); expectation = the 1000 coord tokens collapse onto "
                           "the bin nearest their expected bin (coord-only softmax) carrying their summed probability, "
                           "so a coord is written when the coord mass beats every text token and its value is the "
                           "expectation the geometry losses train (hf backend only; docs/ROLLOUT.md)",
                           enum=("argmax", "expectation"))


@dataclass(frozen=True)
class HFBackendConfig:
    cache: str = knob("auto", "static: preallocated KV cache (fixed shapes, compilable decode step); dynamic: grows "
                      "per step (eager reference); auto: static on CUDA or with compile always, else dynamic",
                      enum=("auto", "static", "dynamic"))
    compile: str = knob("auto", "auto: compile the static-cache decode step on CUDA only; always: on any device; "
                        "never: eager", enum=("auto", "always", "never"))


@dataclass(frozen=True)
class VLLMBackendConfig:
    gpu_memory_utilization: float = knob(0.3, "share of the GPU the colocated engine may take (weights + KV cache), "
                                         "range (0, 1]", exclusive_minimum=0, maximum=1)
    sleep_mode: bool = knob(True, "release the engine's GPU memory between rollouts (vLLM sleep level 1)")
    max_model_len: int | None = knob(None, "engine context length (prompt + generated tokens); null = the model "
                                     "config's", minimum=1)
    enforce_eager: bool = knob(False, "disable vLLM's CUDA graphs (debugging)")


@dataclass(frozen=True)
class MatchingConfig:
    iou_gate: float = knob(0.3, "pairs with IoU below this are infeasible", minimum=0, maximum=1)
    fp_cost: float = knob(1.0, "Hungarian cost of leaving a prediction unmatched; only fp_cost + fn_cost matters: a pair above iou_gate is matched iff 1 - IoU < fp_cost + fn_cost", exclusive_minimum=0)
    fn_cost: float = knob(1.0, "Hungarian cost of leaving a GT object unmatched; only fp_cost + fn_cost matters (see fp_cost)", exclusive_minimum=0)
    desc_gate: float | None = knob(None, "Stage-2 semantic gate: a pair also needs desc similarity >= this (1 for equal "
                                   "normalised descs, else the eval.semantic encoder's cosine, 0 without one); "
                                   "counted in rollout/desc_gate_rejected_total; null = off", minimum=-1, maximum=1)

    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("desc_gate",)  # eval matches boxes: these take their declared default

    def __post_init__(self) -> None:
        # Built by code too (rollout.matching.hungarian_match, tests): the same declaration checks it.
        from configs.validation import check_record

        check_record(self, "rollout_matching.matching")

    @classmethod
    def eval_fields(cls) -> tuple[str, ...]:
        """The knobs eval matching reads (every field but :attr:`TRAINING_ONLY`): ``eval.infer`` flags and the
        checkpoint's saved settings are made from this list, so a new knob needs no edit there."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.TRAINING_ONLY)

    def for_eval(self) -> MatchingConfig:
        """This config with the :attr:`TRAINING_ONLY` knobs at their declared defaults (what eval matches with)."""
        off = {f.name: f.default for f in dataclasses.fields(self) if f.name in self.TRAINING_ONLY}
        return dataclasses.replace(self, **off)


@dataclass(frozen=True)
class EvalDetectionConfig:
    enabled: bool = knob(True, "in-loop eval also computes COCO detection metrics (eval/rollout/mAP, ...) besides the rollout counters")
    metrics: str = knob("coco", "detection metric family: coco (COCO AP), lvis (LVIS federated AP; also chosen when "
                        "the GT carries neg_descs / not_exhaustive_descs), f1ish (F1-ish), both (COCO AP and F1-ish)", enum=("coco", "lvis", "f1ish", "both"))
    score_mode: str = knob("token_prob", "token_prob: mean probability of the object's 4 coord tokens; constant: every object scores 1.0",
                           enum=("token_prob", "constant"))
    score_include_desc: bool = knob(False, "token_prob scores also multiply by the mean probability of the object's desc tokens (docs/EVAL.md)")


@dataclass(frozen=True)
class RolloutMatchingConfig:
    """Rollout generation, matching and in-loop detection eval (both Stage-2 variants; eval_detection/decoding also
    Stage-1 in-loop eval). pipeline only for stage2_rollout_aligned."""

    pipeline: Mapping[str, Any] | None = pipeline_knob("optional; stage2_rollout_aligned only")
    coord_decode_mode: str = knob("exp", "coord decode of the geometry losses", enum=DECODE_MODES)
    backend: str = knob("hf", "hf: transformers generate on the training model (reference); vllm: a colocated vLLM "
                        "engine (requirements-vllm.txt)", enum=("hf", "vllm"))
    hf: HFBackendConfig = section(HFBackendConfig, "the hf backend")
    vllm: VLLMBackendConfig = section(VLLMBackendConfig, "the vllm backend")
    decoding: DecodingConfig = section(DecodingConfig, "generation settings of rollouts and in-loop eval")
    matching: MatchingConfig = section(MatchingConfig, "Hungarian matching of rollout objects to GT")
    eval_detection: EvalDetectionConfig = section(EvalDetectionConfig, "in-loop detection eval")


@dataclass(frozen=True)
class SemanticConfig:
    """Semantic description -> category mapping (eval.semantic): one encoder and rule for offline eval, in-loop eval
    and Stage-2's description gate."""

    model: str | None = knob(None, "sentence-transformers model name or local dir (e.g. "
                             "sentence-transformers/all-MiniLM-L6-v2); null = exact normalised match only",
                             min_length=1)
    threshold: float = knob(0.6, "a desc maps to the GT category of highest cosine similarity when it reaches this; "
                            "below, the prediction is dropped and counted (pred_unmapped_count)", minimum=-1, maximum=1)
    device: str = knob("cpu", "device of the encoder (cpu, cuda, cuda:1, ...)", min_length=1)
    batch_size: int = knob(64, "descs per encoder call", minimum=1)

    def __post_init__(self) -> None:
        # Built by the CLIs too (python -m eval.evaluate --semantic-model ...): the same declaration checks it.
        from configs.validation import check_record

        check_record(self, "eval.semantic")


@dataclass(frozen=True)
class F1ishConfig:
    iou_thresholds: tuple[float, ...] = knob((0.3, 0.5), "IoU thresholds of the F1-ish greedy matching",
                                             items={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                             min_items=1)
    primary_iou: float = knob(0.5, "the threshold of matches.jsonl and per_class.csv (one of iou_thresholds)",
                              exclusive_minimum=0, maximum=1)

    def __post_init__(self) -> None:
        from configs.errors import ConfigError
        from configs.validation import check_record

        check_record(self, "eval.f1ish")
        if not any(abs(float(t) - float(self.primary_iou)) < 1e-9 for t in self.iou_thresholds):
            raise ConfigError("eval.f1ish.primary_iou", f"{self.primary_iou:g} is not one of eval.f1ish.iou_thresholds "
                              f"{list(self.iou_thresholds)}; add it there or pick one of them")


@dataclass(frozen=True)
class OracleConfig:
    k: int = knob(0, "Oracle-K: in-loop eval also samples K rollouts per image and reports the recall / F1 any of "
                  "them reaches (oracle_k@<iou>_* in metrics.json); 0 = off", minimum=0)
    temperature: float = knob(1.0, "sampling temperature of the Oracle-K rollouts", exclusive_minimum=0)
    seed: int = knob(0, "rollout k is sampled with seed + k", minimum=0)


@dataclass(frozen=True)
class EvalConfig:
    """In-loop and offline evaluation: sizes, semantic mapping, F1-ish, artifacts (docs/EVAL.md)."""

    max_samples: int | None = knob(None, "cap on validation images per eval; null = all", minimum=1)
    batch_size: int = knob(8, "images per generation batch during eval", minimum=1)
    semantic: SemanticConfig = section(SemanticConfig, "semantic desc -> category mapping (off while model is null)")
    f1ish: F1ishConfig = section(F1ishConfig, "F1-ish set matching (docs/EVAL.md \"F1-ish\")")
    oracle: OracleConfig = section(OracleConfig, "Oracle-K sampled rollouts (docs/EVAL.md \"Oracle-K\")")
    artifacts_max_images: int = knob(2000, "in-loop eval writes per_image.json / matches.jsonl for at most this many "
                                     "images (size bound; offline eval writes all)", minimum=0)


# ---------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    """A loaded, validated, defaults-filled config.

    ``raw``: the merged user tree (after ``extends`` and ``--set``, before defaults,
    without ``extends``); ``resolved``: the full tree with defaults (what
    ``config.resolved.yaml`` holds); ``path``: the file that was loaded;
    ``variant``: ``stage1`` | ``stage2_two_channel`` | ``stage2_rollout_aligned``;
    ``pipeline``: the ``configs.pipeline.ResolvedPipeline`` for this variant.
    """

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    custom: CustomConfig
    stage1: Stage1Config
    stage2_ab: Stage2ABConfig
    rollout_matching: RolloutMatchingConfig
    eval: EvalConfig
    raw: Mapping[str, Any]
    resolved: Mapping[str, Any]
    path: Path | None
    variant: str
    pipeline: ResolvedPipeline

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy of :attr:`resolved` (for trackers and serialisation)."""
        return thaw(self.resolved)


# Fields of ``Config`` that are not config sections (not in the schema).
CONFIG_META_FIELDS = ("raw", "resolved", "path", "variant", "pipeline")
