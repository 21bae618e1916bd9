"""Parameter-efficient training: LoRA (through ``peft``) and the coord-offset adapter.

Under an adapter (``model.adapter.type`` ``lora`` or ``coord_offset``) every base weight is frozen and
only small tensors train:

- **LoRA** (``peft.inject_adapter_in_model``): low-rank ``A``/``B`` pairs beside the target ``nn.Linear``
  layers, injected in place so the model stays a ``Qwen3VLForConditionalGeneration`` (the forward
  preamble, generation and the losses need no special case).
- **Coord offsets** (:class:`CoordRowOffset`): a trainable ``[1000, H]`` offset added to the coord
  rows of the input-embedding table and of the LM head (one offset when the two are tied). It is a
  ``torch.nn.utils.parametrize`` parametrization of the tables' ``weight``, so *every* reader sees
  ``base + offset``: the embedding lookup, the LM head in ``generate``, the losses that project
  hidden states onto ``lm_head.weight`` and Channel-A's soft/ST context embeddings (which read the
  coord rows of the input table). The base rows never change.

Reading a parametrized ``weight`` rebuilds the table (one ``[V, H]`` concatenation: a copy per read,
~1.2 GB in fp32 for Qwen3-VL-2B). Training reads it a few times per step; generation wraps its loop in
``parametrize.cached()`` so it is rebuilt once per call, not per decoded token.

A checkpoint of an adapter run saves only the trainable tensors (``adapter.safetensors``, a few MB)
and ``adapter.json`` (adapter config + the base checkpoint it applies to). :func:`merge_adapter`
folds both kinds into plain weights; ``model.loading.load_model_and_processors`` does it when it is
given an adapter directory, so ``eval/infer.py``, a Stage-2 run starting from a LoRA Stage-1
checkpoint and ``scripts/merge_adapter.py`` all get an ordinary model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from configs.validation import declared_enum
from model.shapes import logical_numel, logical_shape
from model.vocab import CoordVocab

if TYPE_CHECKING:
    from configs.types import AdapterConfig

ADAPTER_TYPES = declared_enum("model.adapter.type")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
# Leaf names of the Qwen3-VL vision blocks and of the patch / deepstack mergers.
VISION_LORA_TARGETS = ("qkv", "proj", "linear_fc1", "linear_fc2")
MERGER_LORA_TARGETS = ("linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class AdapterSpec:
    """What to attach (``model.adapter`` in the config; see docs/MODEL.md)."""

    type: str = "none"  # none | lora | coord_offset
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision: bool = False
    merger: bool = False
    coord_offset: bool = True  # with lora: also train the coord rows' offsets

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    @property
    def uses_coord_offset(self) -> bool:
        return self.type == "coord_offset" or (self.type == "lora" and self.coord_offset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
            "target_modules": list(self.target_modules), "vision": self.vision, "merger": self.merger,
            "coord_offset": self.coord_offset,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        d = dict(d)
        d["target_modules"] = tuple(d.get("target_modules", cls.target_modules))
        return cls(**d)


def spec_from_config(adapter_cfg: AdapterConfig) -> AdapterSpec:
    """``AdapterSpec`` from the typed ``model.adapter`` config section."""
    lora = adapter_cfg.lora
    return AdapterSpec(
        type=adapter_cfg.type, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
        target_modules=tuple(lora.target_modules), vision=lora.vision, merger=lora.merger,
        coord_offset=adapter_cfg.coord_offset,
    )


class CoordRowOffset(nn.Module):
    """Parametrization ``W -> W + offset`` on rows ``[first_id, first_id + n)`` of a ``[V, H]`` table.

    ``offset`` ``[n, H]`` starts at zero (the adapted model equals the base model at step 0). One
    instance is registered on both tables when the LM head is tied to the input embeddings, so the
    tie holds for the offsets too.
    """

    def __init__(self, first_id: int, num_rows: int, hidden: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.first_id = int(first_id)
        self.offset = nn.Parameter(torch.zeros(num_rows, hidden, dtype=dtype, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.first_id, self.first_id + self.offset.shape[0]
        return torch.cat([weight[:a], weight[a:b] + self.offset.to(weight.dtype), weight[b:]], dim=0)


def _lora_target_regex(spec: AdapterSpec) -> str:
    """A full-name regex for peft: the LM's target leaves, plus vision blocks / mergers when asked."""
    alts = [rf"model\.language_model\.layers\.\d+\..*\.({'|'.join(map(re.escape, spec.target_modules))})"]
    if spec.vision:
        alts.append(rf"model\.visual\.blocks\.\d+\..*\.({'|'.join(VISION_LORA_TARGETS)})")
    if spec.merger:
        alts.append(rf"model\.visual\.(merger|deepstack_merger_list\.\d+)\.({'|'.join(MERGER_LORA_TARGETS)})")
    return "^(" + "|".join(alts) + ")$"


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The tensor a table stores: its parametrization's original when parametrized, else ``weight``."""
    return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight


def _tables_tied(vlm) -> bool:
    return _stored_weight(vlm.get_output_embeddings()) is _stored_weight(vlm.get_input_embeddings())


def _count(params) -> int:
    return int(sum(logical_numel(p) for p in params))


def apply_adapter(vlm, spec: AdapterSpec, coord_vocab: CoordVocab, seed: int = 0) -> dict[str, int]:
    """Freeze the whole base model and attach the adapter in place; returns parameter counts.

    ``{"trainable", "frozen", "total", "lora", "coord_offset"}`` (tied tables counted once). LoRA's ``A``
    matrices are initialised from ``seed`` (``B`` and the offsets start at zero), independently of the
    global RNG, so a run's initial adapter does not depend on what ran before it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _apply_adapter(vlm, spec, coord_vocab)


def _apply_adapter(vlm, spec: AdapterSpec, coord_vocab: CoordVocab) -> dict[str, int]:
    if spec.type not in ADAPTER_TYPES:
        raise ValueError(f"model.adapter.type must be one of {list(ADAPTER_TYPES)}, got {spec.type!r}")
    if not spec.enabled:
        raise ValueError("apply_adapter: model.adapter.type is none")
    tied = _tables_tied(vlm)
    for p in vlm.parameters():
        p.requires_grad_(False)
    if spec.type == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                         target_modules=_lora_target_regex(spec), bias="none")
        try:
            inject_adapter_in_model(cfg, vlm)
        except ValueError as exc:  # peft: no module matched
            raise ValueError(
                f"model.adapter.lora.target_modules={list(spec.target_modules)} (vision={spec.vision}, "
                f"merger={spec.merger}) matches no linear layer of this model; Qwen3-VL's language model has "
                "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
            ) from exc
        for name, p in vlm.named_parameters():
            if ".lora_" in name:  # fp32 masters over a possibly half-precision frozen base
                p.data = p.data.float()
    if spec.uses_coord_offset:
        emb = vlm.get_input_embeddings()
        head = vlm.get_output_embeddings()
        w = emb.weight
        # Adapter tensors are fp32 whatever the base dtype: they are the only master weights of the run.
        offset = CoordRowOffset(coord_vocab.first_id, coord_vocab.num_bins, logical_shape(w)[1], torch.float32, w.device)
        parametrize.register_parametrization(emb, "weight", offset, unsafe=True)
        head_offset = offset if tied else CoordRowOffset(
            coord_vocab.first_id, coord_vocab.num_bins, logical_shape(head.weight)[1], torch.float32, head.weight.device)
        parametrize.register_parametrization(head, "weight", head_offset, unsafe=True)
    params = list(vlm.parameters())
    trainable = [p for p in params if p.requires_grad]
    counts = {
        "trainable": _count(trainable),
        "total": _count(params),
        "lora": _count(p for n, p in vlm.named_parameters() if p.requires_grad and ".lora_" in n),
        "coord_offset": _count(p for n, p in vlm.named_parameters() if p.requires_grad and n.endswith(".offset")),
    }
    counts["frozen"] = counts["total"] - counts["trainable"]
    if counts["trainable"] == 0:
        raise ValueError(
            f"model.adapter: nothing to train (no module matched model.adapter.lora.target_modules="
            f"{list(spec.target_modules)} and no coord offset)"
        )
    return counts


def adapter_state_dict(vlm) -> dict[str, torch.Tensor]:
    """The trainable tensors of an adapted model, by parameter name (shared tensors once)."""
    return {n: p.detach() for n, p in vlm.named_parameters() if p.requires_grad}


def save_adapter(vlm, out_dir: str | Path, spec: AdapterSpec, base: str, coord_init: str = "sincos") -> None:
    """Write ``adapter.safetensors`` + ``adapter.json`` into ``out_dir``.

    ``adapter.json`` records the spec, the base checkpoint and the coord-row init used when the base
    had to be given coord tokens at load (the rebuilt base must match the one trained on).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(vlm).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS))
    meta = {"adapter": spec.to_dict(), "base": base, "coord_init": coord_init}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def is_adapter_dir(path: str | Path) -> bool:
    return os.path.isfile(os.path.join(str(path), ADAPTER_CONFIG))


@dataclass(frozen=True)
class AdapterCheckpoint:
    """What ``adapter.json`` records."""

    spec: AdapterSpec
    base: str
    coord_init: str


def read_adapter_config(path: str | Path) -> AdapterCheckpoint:
    file = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(file.read_text())
        return AdapterCheckpoint(AdapterSpec.from_dict(meta["adapter"]), meta["base"], meta.get("coord_init", "sincos"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a valid adapter config ({exc})") from exc


def load_adapter_weights(vlm, path: str | Path) -> None:
    """Copy ``path/adapter.safetensors`` into the adapted ``vlm``; names and shapes must match exactly."""
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own types for truncated/corrupt files
        raise ValueError(f"{file}: cannot read the adapter weights ({exc})") from exc
    own = adapter_state_dict(vlm)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(
            f"{file}: adapter tensors do not match model.adapter (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"use the same model.adapter settings as the run that saved it ({file.parent / ADAPTER_CONFIG})"
        )
    with torch.no_grad():
        for name, param in vlm.named_parameters():
            if name in state:
                if tuple(state[name].shape) != tuple(param.shape):
                    raise ValueError(f"{file}: {name} has shape {tuple(state[name].shape)}, model {tuple(param.shape)}")
                param.copy_(state[name].to(param.dtype))


def merge_adapter(vlm) -> None:
    """Fold LoRA and coord offsets into plain weights in place; the model is then an ordinary Qwen3-VL.

    LoRA: each adapted layer's ``W += scale * B @ A`` and the layer is replaced by its base
    ``nn.Linear``. Offsets: the parametrized tables become plain parameters holding ``base + offset``
    (re-tied when they were tied).
    """
    from peft.tuners.lora import LoraLayer

    tied = _tables_tied(vlm)
    for name, module in list(vlm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(vlm.get_submodule(parent_name) if parent_name else vlm, child, module.get_base_layer())
    emb, head = vlm.get_input_embeddings(), vlm.get_output_embeddings()
    if parametrize.is_parametrized(emb, "weight"):
        # Removal writes the merged value into the (shared, when tied) original tensor in place: fold the
        # offset through one table only, then re-tie.
        parametrize.remove_parametrizations(head, "weight", leave_parametrized=not tied)
        parametrize.remove_parametrizations(emb, "weight", leave_parametrized=True)
    if tied:
        head.weight = emb.weight
    for p in vlm.parameters():
        p.requires_grad_(True)
