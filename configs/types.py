"""The typed config tree: frozen dataclasses, one per map in docs/CONFIG.md.

Attribute access follows the YAML key tree exactly (``cfg.training.lr``,
``cfg.stage2_ab.schedule.b_ratio``). Defaults live in the JSON Schemas
(``configs/schema/*.json``), not here: the loader fills them before building
these objects, so every field is always set and there is one source of truth.
A test checks that the fields below and the schema properties agree at every level.

Lists become tuples and free-form maps (pipeline lists, module configs) become
:class:`FrozenDict`, so nothing reachable from a :class:`Config` can be mutated.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class TrackerConfig:
    backend: str  # none | wandb; metrics.jsonl is written regardless
    mode: str  # online | offline
    project: str
    entity: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class RunConfig:
    name: str
    output_dir: str
    seed: int
    log_every: int
    overwrite: bool  # delete an existing run dir first (else a finished/used run dir is refused unless resuming)
    tracker: TrackerConfig

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``: where checkpoints, metrics.jsonl and config.resolved.yaml go."""
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class TinyModelConfig:
    enabled: bool
    dir: str
    seed: int
    hidden: int
    layers: int
    vision_hidden: int
    vision_depth: int
    max_pixels: int  # image processor budget, pixels


@dataclass(frozen=True)
class CoordTokensConfig:
    add_if_missing: bool
    init: str  # sincos | mean | random


@dataclass(frozen=True)
class FreezeConfig:
    vision: bool
    merger: bool
    language_model: bool


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    vision: bool
    merger: bool


@dataclass(frozen=True)
class AdapterConfig:
    type: str  # none | lora | coord_offset
    coord_offset: bool
    lora: LoraConfig


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str | None
    tiny: TinyModelConfig
    dtype: str  # float32 | bfloat16 | float16
    attn_implementation: str  # auto | sdpa | eager | flash_attention_2
    coord_tokens: CoordTokensConfig
    gradient_checkpointing: bool
    freeze: FreezeConfig
    adapter: AdapterConfig


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class SyntheticDataConfig:
    enabled: bool
    out_dir: str
    num_train: int
    num_val: int
    image_size: int  # pixels (square)
    max_shapes: int
    seed: int


@dataclass(frozen=True)
class DataConfig:
    train_jsonl: str | None  # None only when synthetic.enabled (checked by the loader)
    val_jsonl: str | None
    image_root: str | None
    coords: str  # pixel | bins
    object_order: str  # yx | none
    max_objects: int | None
    min_pixels: int | None
    max_pixels: int | None
    prompt: str
    system_prompt: str | None
    skip_invalid: bool
    cache_dir: str | None  # Arrow record cache + lengths + packing plan (null: beside the JSONL)
    num_workers: int  # DataLoader workers that encode + collate micro-batches (0 = in process)
    synthetic: SyntheticDataConfig


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class LrMultConfig:
    vision: float
    merger: float
    language_model: float


@dataclass(frozen=True)
class TrainingConfig:
    max_steps: int  # optimizer steps
    batch_size: int  # packed rows (packing) or samples per micro-step and rank
    max_length: int  # tokens
    packing: bool
    gradient_accumulation_steps: int
    lr: float
    lr_mult: LrMultConfig  # multiplier of lr per model part
    weight_decay: float
    adam_betas: tuple[float, float]
    adam_eps: float
    lr_scheduler: str  # cosine | linear | constant
    warmup_steps: int
    warmup_ratio: float  # fraction of max_steps, [0, 1)
    min_lr_ratio: float  # fraction of lr
    max_grad_norm: float  # 0 disables clipping
    max_consecutive_nonfinite: int  # non-finite (skipped) optimizer steps in a row that stop the run
    mixed_precision: str  # no | bf16 | fp16
    save_every: int  # 0 = only at the end
    save_total_limit: int | None
    save_on_interrupt: bool  # SIGTERM / SIGINT: finish the step, save, stop
    collective_timeout_s: int  # DDP collective timeout (InitProcessGroupKwargs)
    eval_every: int  # 0 = only at the end
    resume_from: str | None  # checkpoint dir or "latest"


# ---------------------------------------------------------------- custom


@dataclass(frozen=True)
class CoordSoftCEW1Config:
    enabled: bool
    ce_weight: float
    soft_ce_weight: float
    w1_weight: float
    gate_weight: float
    temperature: float
    target_sigma: float  # bins
    target_truncate: int | None  # bins


@dataclass(frozen=True)
class CustomConfig:
    trainer_variant: str | None  # stage2_two_channel | stage2_rollout_aligned | None (Stage-1)
    coord_soft_ce_w1: CoordSoftCEW1Config


# ---------------------------------------------------------------- objective surfaces
# ``pipeline`` is the user's list exactly as written (frozen), or None when omitted;
# the resolved module lists with defaults and checksum are on ``Config.pipeline``.


@dataclass(frozen=True)
class Stage1Config:
    pipeline: Mapping[str, Any] | None


@dataclass(frozen=True)
class ScheduleConfig:
    b_ratio: float  # target fraction of Rollout steps, [0, 1]


@dataclass(frozen=True)
class ChannelBConfig:
    drop_invalid_struct_ce_multiplier: float  # losses.masks.DROP_INVALID_MULTIPLIER_RANGE


@dataclass(frozen=True)
class FallbackConfig:
    on_rollout_failure: str  # fail | expectation


@dataclass(frozen=True)
class Stage2ABConfig:
    schedule: ScheduleConfig
    n_softctx_iter: int
    softctx_grad_mode: str  # unroll | em_detach
    softctx_temperature: float
    coord_ctx_embed_mode: str  # soft | st | hard
    coord_decode_mode: str  # exp | st
    desc_ce_weight: float
    fmt_struct_ce_weight: float
    bbox_smoothl1_weight: float
    bbox_ciou_weight: float
    coord_ce_weight: float
    coord_el1_weight: float
    coord_ehuber_weight: float
    coord_huber_delta: float
    coord_entropy_weight: float
    coord_gate_weight: float
    text_gate_weight: float
    channel_b: ChannelBConfig
    fallback: FallbackConfig
    pipeline: Mapping[str, Any] | None


@dataclass(frozen=True)
class DecodingConfig:
    temperature: float  # 0.0 = greedy
    top_p: float
    top_k: int  # 0 = off
    max_new_tokens: int
    batch_size: Any  # int >= 1 | "auto" (rollout.backends.auto_batch_size)
    seed: int


@dataclass(frozen=True)
class HFBackendConfig:
    cache: str  # static | dynamic
    compile: str  # auto | always | never


@dataclass(frozen=True)
class VLLMBackendConfig:
    gpu_memory_utilization: float
    sleep_mode: bool
    max_model_len: int | None
    enforce_eager: bool


@dataclass(frozen=True)
class MatchingConfig:
    iou_gate: float
    fp_cost: float
    fn_cost: float


@dataclass(frozen=True)
class EvalDetectionConfig:
    enabled: bool
    metrics: str  # coco
    score_mode: str  # token_prob | constant
    score_include_desc: bool


@dataclass(frozen=True)
class RolloutMatchingConfig:
    pipeline: Mapping[str, Any] | None
    coord_decode_mode: str  # exp | st
    backend: str  # hf | vllm
    hf: HFBackendConfig
    vllm: VLLMBackendConfig
    decoding: DecodingConfig
    matching: MatchingConfig
    eval_detection: EvalDetectionConfig


@dataclass(frozen=True)
class EvalConfig:
    max_samples: int | None
    batch_size: int


# ---------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    """A loaded, validated, defaults-filled config.

    ``raw``: the merged user tree (after ``extends`` and ``--set``, before defaults,
    without ``extends``); ``resolved``: the full tree with defaults (what
    ``config.resolved.yaml`` holds); ``path``: the file that was loaded;
    ``variant``: ``stage1`` | ``stage2_two_channel`` | ``stage2_rollout_aligned``;
    ``pipeline``: the ``pipeline.manifest.ResolvedPipeline`` for this variant.
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
    pipeline: Any

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy of :attr:`resolved` (for trackers and serialisation)."""
        return thaw(self.resolved)


# Fields of ``Config`` that are not config sections (not in the schema).
CONFIG_META_FIELDS = ("raw", "resolved", "path", "variant", "pipeline")
