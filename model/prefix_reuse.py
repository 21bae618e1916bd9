"""Prefix reuse for Channel-A forwards 2..N (``stage2_ab.prefix_reuse``, docs/training/STAGE2_RUNBOOK.md).

Forwards 2..N of the Expectation step change only the coord *input* slots. With causal attention
inside each packed segment, every position before its segment's first coord slot has the same
inputs in all N forwards, hence the same hidden states and keys/values at every layer. So a later
forward recomputes only the *suffix* (each segment from its first coord slot to its end); its
queries attend to forward 1's keys/values for the prefix and to their own for the suffix:

- forward 1 (the ordinary ``gt`` forward) runs with hooks that record each decoder layer's key
  (``k_norm`` output, before rope) and value (``v_proj`` output) for every position;
- a later forward (``model.forward.suffix_hidden_states``) gathers the suffix embeddings into ``[B, S]`` (``S`` = the longest
  row's suffix count), runs the language model on them with their own multimodal position ids, an
  explicit ``[B, 1, S, T]`` mask (query ``(b, col)`` sees the positions of its own segment up to
  ``col``) and a read-only cache object whose ``update`` returns forward 1's keys/values of the
  whole row with the suffix positions replaced by the fresh ones; the keys stay in their physical
  places, so the mask is the packed causal mask restricted to the suffix rows;
- the returned hidden states are forward 1's with the suffix positions replaced.

Forward 1's recorded keys/values stay in the autograd graph: forward 2's loss back-propagates
through them into the prefix computation exactly as a full recomputation would through its own
(identical) prefix, for both ``softctx_grad_mode`` values. Padding positions (outside every
segment) keep forward 1's hidden states; no loss reads them.

Reuse needs a mask the attention kernel accepts (``sdpa``, ``eager``) and no image token inside a
suffix (deepstack features are added at image positions inside the decoder); otherwise
:func:`plan_prefix_reuse` returns None with the reason and the caller recomputes in full.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from core.vocab import COORD, LOGGER_NAME
from data.types import PackedBatch
from model import packed_attention
from model.forward import unwrap_vlm

logger = logging.getLogger(LOGGER_NAME)

# attention implementations that take an explicit [B, 1, S, T] mask (sdpa_packed hands such calls to sdpa)
MASK_KERNELS = ("sdpa", packed_attention.NAME, "eager")


@dataclass(frozen=True)
class SuffixLayout:
    """Where forwards 2..N recompute (host-computed once per batch, tensors on the batch's device).

    cols      [B, S] long: column of the s-th recomputed position of row b (0 where not ``valid``)
    valid     [B, S] bool: real suffix slot (rows shorter than ``S`` are right-padded; ``S >= 1`` so
              every forward calls every decoder layer, as sharded engines need)
    q_seg     [B, S] long: segment id of each slot (-2 where not ``valid``)
    seg       [B, T] long: segment id of each position of the batch (-1 for padding)
    rows, slots, flat_cols  [M] long: the valid slots as (row, slot, column), row-major (M = valid.sum());
              index tensors, so gathering and scattering them never reads a mask back to the host
    reusable  fraction of the real tokens that forwards 2..N take from forward 1
    """

    cols: torch.Tensor
    valid: torch.Tensor
    q_seg: torch.Tensor
    seg: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    flat_cols: torch.Tensor
    reusable: float


def _layers(vlm):
    return unwrap_vlm(vlm).model.language_model.layers


def attn_kernel(vlm) -> str:
    return unwrap_vlm(vlm).model.language_model.config._attn_implementation


def plan_prefix_reuse(vlm, batch: PackedBatch, warned: set[str] | None = None) -> SuffixLayout | None:
    """The suffix layout of ``batch``, or None (logged) when reuse cannot be exact here.

    ``warned``: the owner's set of reasons already logged (a ``TrainingWrapper`` holds one per run, so
    each run logs a reason once, however many runs share the process); None logs every refusal.

    One host copy of ``token_types`` / ``mm_token_type_ids`` (the per-segment search runs on the CPU,
    like ``model.forward.position_ids_for_batch``).
    """
    kernel = attn_kernel(vlm)
    reason = None
    if kernel not in MASK_KERNELS:
        reason = (f"attention implementation {kernel!r} takes no explicit mask (reuse needs one of "
                  f"{', '.join(MASK_KERNELS)})")
    types, mm = batch.token_types.cpu(), batch.mm_token_type_ids.cpu()
    bsz, seq = types.shape
    seg = torch.full((bsz, seq), -1, dtype=torch.long)
    per_row: list[list[tuple[int, int, int]]] = [[] for _ in range(bsz)]  # (segment id, first, end)
    for sid, s in enumerate(batch.segments):
        end = s.start + s.length
        seg[s.row, s.start : end] = sid
        coord = (types[s.row, s.start : end] == COORD).nonzero()
        if coord.numel():
            first = s.start + int(coord[0])
            if reason is None and bool((mm[s.row, first:end] != 0).any()):
                reason = "an image token lies after its sample's first coord slot (deepstack would need it)"
            per_row[s.row].append((sid, first, end))
    if reason is not None:
        if warned is None or reason not in warned:
            if warned is not None:
                warned.add(reason)
            logger.warning("stage2_ab.prefix_reuse: full recomputation of Channel-A forwards 2..N: %s", reason)
        return None
    counts = [sum(end - first for _, first, end in row) for row in per_row]
    width = max(1, *counts)
    cols = torch.zeros(bsz, width, dtype=torch.long)
    q_seg = torch.full((bsz, width), -2, dtype=torch.long)
    for b, row in enumerate(per_row):
        at = 0
        for sid, first, end in row:
            n = end - first
            cols[b, at : at + n] = torch.arange(first, end)
            q_seg[b, at : at + n] = sid
            at += n
    valid = q_seg >= 0
    rows, slots = valid.nonzero(as_tuple=True)
    real = sum(s.length for s in batch.segments)
    device = batch.token_types.device
    return SuffixLayout(cols=cols.to(device), valid=valid.to(device), q_seg=q_seg.to(device), seg=seg.to(device),
                        rows=rows.to(device), slots=slots.to(device), flat_cols=cols[rows, slots].to(device),
                        reusable=1.0 - sum(counts) / max(real, 1))


class KVRecorder:
    """Forward hooks recording, for every decoder layer, the key (``k_norm`` output ``[B, T, kvH, D]``,
    before rope) and the value (``v_proj`` output ``[B, T, kvH * D]``) of one language-model call.

    Use as a context manager around forward 1 only: the hooks are gone before any backward, so a
    gradient-checkpointing recomputation never records.
    """

    def __init__(self, vlm):
        self._layers = _layers(vlm)
        n = len(self._layers)
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self._handles = []

    def _hook(self, store: list, index: int):
        def record(_module, _args, output):
            store[index] = output

        return record

    def __enter__(self) -> KVRecorder:
        for i, layer in enumerate(self._layers):
            attn = layer.self_attn
            self._handles.append(attn.k_norm.register_forward_hook(self._hook(self.keys, i)))
            self._handles.append(attn.v_proj.register_forward_hook(self._hook(self.values, i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    return rotate_half(x)


class _PrefixCache:
    """Read-only stand-in for a KV cache in forwards 2..N: ``update`` returns forward 1's keys / values
    ``[B, kvH, T, D]`` of layer ``layer_idx`` with the suffix positions replaced by the fresh ones
    (``[B, kvH, S, D]``). It stores nothing, so a gradient-checkpointing replay reads the same states."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], layout: SuffixLayout):
        self.keys, self.values, self.layout = keys, values, layout

    def _merge(self, prefix: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        merged = prefix.transpose(1, 2).index_put((lay.rows, lay.flat_cols), fresh.transpose(1, 2)[lay.rows, lay.slots])
        return merged.transpose(1, 2)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self._merge(self.keys[layer_idx], key_states), self._merge(self.values[layer_idx], value_states)


@contextmanager
def _cache_kept_under_checkpointing(layers):
    """Let checkpointed decoder layers keep our cache (transformers drops a cache under gradient
    checkpointing unless the layer declares ``_can_checkpoint_with_cache``: ours only reads)."""
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


class PrefixReuse:
    """Forwards 2..N of one Expectation step from forward 1's recorded keys/values (module docstring).

    ``hidden`` ``[B, T, H]``: forward 1's final hidden states; ``position_ids`` ``[4, B, T]``.
    """

    def __init__(self, vlm, recorder: KVRecorder, layout: SuffixLayout, position_ids: torch.Tensor,
                 hidden: torch.Tensor):
        lm = unwrap_vlm(vlm).model.language_model
        self.kernel = attn_kernel(vlm)
        self.layout, self.hidden = layout, hidden
        if any(k is None for k in recorder.keys) or any(v is None for v in recorder.values):
            raise RuntimeError("prefix reuse: forward 1 did not record every decoder layer's keys and values")
        if hidden.requires_grad and not all(k.requires_grad for k in recorder.keys):
            raise ValueError(
                "stage2_ab.prefix_reuse needs forward 1's keys in the autograd graph, but they were recorded "
                "without gradient (reentrant gradient checkpointing?); enable checkpointing with "
                "use_reentrant=False (as the recipes do) or set stage2_ab.prefix_reuse=false"
            )
        bsz, seq, _ = hidden.shape
        # forward 1's rope, applied once here for all later forwards (the attention applies it after k_norm),
        # in the dtype of the decoder's input embeddings as there (``hidden`` may be an fp32-converted output)
        self.dtype = lm.get_input_embeddings().weight.dtype
        cos, sin = lm.rotary_emb(torch.empty(0, dtype=self.dtype, device=hidden.device), position_ids[1:])
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        keys, values = [], []
        for k, v in zip(recorder.keys, recorder.values):
            k = k.transpose(1, 2)  # [B, kvH, T, D]
            keys.append(k * cos + _rotate_half(k) * sin)
            values.append(v.view(bsz, seq, -1, k.shape[-1]).transpose(1, 2))
        recorder.keys = recorder.values = None  # the pre-rope keys are not saved for backward: let them go
        self.cache = _PrefixCache(keys, values, layout)
        cols = layout.cols
        self.position_ids = position_ids.gather(2, cols.unsqueeze(0).expand(4, -1, -1))  # [4, B, S]
        self.mask = self._mask(seq)

    def _mask(self, seq: int) -> torch.Tensor:
        """``[B, 1, S, T]``: slot (b, s) sees positions of its own segment up to its column; a padding slot
        sees column 0 only (its output is discarded; an all-masked row would give NaN)."""
        lay = self.layout
        keys = torch.arange(seq, device=lay.cols.device)
        allowed = (lay.seg.unsqueeze(1) == lay.q_seg.unsqueeze(2)) & (keys <= lay.cols.unsqueeze(2))
        allowed |= (~lay.valid).unsqueeze(2) & (keys == 0)
        allowed = allowed.unsqueeze(1)
        if self.kernel == "eager":  # eager adds the mask to the scores
            dtype = self.dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def gather(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` input embeddings of a later forward -> ``[B, S, H]`` at the suffix slots (they may
        differ from forward 1's only there)."""
        cols = self.layout.cols
        return inputs_embeds.gather(1, cols.unsqueeze(2).expand(-1, -1, inputs_embeds.shape[-1]))

    def decode(self, vlm, suffix_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The language model on ``suffix_embeds`` ``[B, S, H]`` against the recorded prefix -> ``[B, S, H]``.
        Called by ``model.forward.HiddenStatesModel.forward`` (``prefix=``)."""
        lm = unwrap_vlm(vlm).model.language_model
        with _cache_kept_under_checkpointing(lm.layers):
            out = lm(inputs_embeds=suffix_embeds, position_ids=position_ids, attention_mask=self.mask,
                     cache=self.cache, use_cache=False)
        return out.last_hidden_state

    def scatter(self, suffix_hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` -> ``[B, T, H]``: forward 1's hidden states with the suffix positions replaced."""
        lay = self.layout
        fresh = suffix_hidden[lay.rows, lay.slots]
        return self.hidden.index_put((lay.rows, lay.flat_cols), fresh.to(self.hidden.dtype))


__all__ = ["KVRecorder", "MASK_KERNELS", "PrefixReuse", "SuffixLayout", "plan_prefix_reuse"]
