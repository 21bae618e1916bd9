"""Per-token CE weights for every context (docs/training/METRICS_LOSSES.md): the one mask builder all trainers use.

All tensors are ``[B, T]`` and indexed by token position ``j`` (the token as it sits in
``input_ids``); the CE that uses a weight at ``j`` reads logits at ``j - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from core.vocab import CONTEXTS, DESC, EOS, FN, FP, GT, MATCHED, NO_SUBSET, SELF_CONTEXT, STRUCT
from losses.checks import content_checks


class TokenCEKnobs(Protocol):
    """What the mask builder reads of token_ce's knobs: ``configs.modules.TokenCEWeights`` (declared there once,
    with defaults and ranges; ``losses/`` imports no config)."""

    desc_ce_weight: float
    self_context_struct_ce_weight: float
    rollout_fn_desc_weight: float
    rollout_matched_prefix_struct_weight: float
    rollout_drop_invalid_struct_ce_multiplier: float


@dataclass
class TokenCEMasks:
    """Per-token CE weights, ``[B, T]`` float.

    struct: weights of ``struct`` tokens *and* the ``eos`` token (counted once, here only).
    desc:   weights of ``desc`` tokens.
    Coord, prompt and IGNORE tokens are 0 in both.
    eos:    [B, T] bool, where the token is ``eos`` (lets text-gate positions exclude it).
    """

    struct: torch.Tensor
    desc: torch.Tensor
    eos: torch.Tensor | None = None


def build_token_ce_weights(
    context: str,
    token_types: torch.Tensor,
    weights: TokenCEKnobs,
    *,
    subset: torch.Tensor | None = None,
    closure: torch.Tensor | None = None,
    dropped_invalid: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> TokenCEMasks:
    """Token CE weights of one context (docs/training/METRICS_LOSSES.md).

    token_types        [B, T] long registry codes (IGNORE on prompt/padding)
    subset             [B, T] long registry subset codes; required for ``rollout``
    closure            [B, T] bool, the token holding the outermost ``}``; required for ``rollout``
    dropped_invalid    [B, T] bool, tokens of samples that dropped an invalid object (rollout only;
                       ``PackedBatch.dropped_invalid``): their struct weights are multiplied by
                       ``weights.rollout_drop_invalid_struct_ce_multiplier``. The sample carries only
                       the fact; the size of the effect lives only in the module config.
    segment_ids        [B, T] long; when given, a supervised token may not be the first token of
                       a segment (its logits would come from the previous segment) nor padding

    gt:           struct+eos 1, desc ``desc_ce_weight``.
    self_context: struct+eos ``self_context_struct_ce_weight``, desc 0.
    rollout:      matched struct ``rollout_matched_prefix_struct_weight``, desc 0; fp all 0;
                  fn struct 1, desc ``rollout_fn_desc_weight``; NO_SUBSET struct (container
                  opening, separators) the matched-prefix struct weight; struct weights times
                  the drop-invalid multiplier where ``dropped_invalid``; then the closure token and eos are set to exactly 1
                  (never multiplied, never zeroed by fp; the closure counts as struct).
    """
    if context not in CONTEXTS:
        raise ValueError(f"context {context!r} unknown; allowed: {', '.join(CONTEXTS)}")
    if token_types.dim() != 2:
        raise ValueError(f"token_types must be [B, T], got shape {tuple(token_types.shape)}")
    tt = token_types
    is_struct = tt == STRUCT
    is_desc = tt == DESC
    is_eos = tt == EOS
    f32 = torch.float32

    if context == GT:
        struct = (is_struct | is_eos).to(f32)
        desc = is_desc.to(f32) * float(weights.desc_ce_weight)
    elif context == SELF_CONTEXT:
        struct = (is_struct | is_eos).to(f32) * float(weights.self_context_struct_ce_weight)
        desc = torch.zeros_like(struct)
    else:
        if subset is None or closure is None:
            raise ValueError(
                "rollout context needs subset= and closure= ([B, T] tensors from the packed batch): "
                "FP spans and the outermost '}' cannot be found from token types alone"
            )
        _check_shape("subset", subset, tt)
        _check_shape("closure", closure, tt)
        closure = closure.to(torch.bool)
        check = content_checks(tt)
        if check and (closure & ~(is_struct | is_desc)).any():
            bad = torch.nonzero(closure & ~(is_struct | is_desc))[0].tolist()
            raise ValueError(f"closure token at [row, pos] = {bad} has type {int(tt[bad[0], bad[1]])}, "
                             "expected struct (or desc for a fused token)")
        orphan_desc = is_desc & (subset == NO_SUBSET) & ~closure
        if check and orphan_desc.any():
            bad = torch.nonzero(orphan_desc)[0].tolist()
            raise ValueError(
                f"desc token at [row, pos] = {bad} lies in no object span (subset NO_SUBSET); "
                "rollout desc tokens must belong to a matched/fp/fn object (fix the rollout builder's spans)"
            )
        w_prefix = float(weights.rollout_matched_prefix_struct_weight)
        struct_w = torch.zeros(tt.shape, dtype=f32, device=tt.device)
        struct_w = torch.where(subset == MATCHED, w_prefix, struct_w)
        struct_w = torch.where(subset == NO_SUBSET, w_prefix, struct_w)
        struct_w = torch.where(subset == FN, 1.0, struct_w)
        struct_w = torch.where(subset == FP, 0.0, struct_w)
        struct = is_struct.to(f32) * struct_w
        if dropped_invalid is not None:
            _check_shape("dropped_invalid", dropped_invalid, tt)
            mult = float(weights.rollout_drop_invalid_struct_ce_multiplier)
            struct = torch.where(dropped_invalid.to(torch.bool), struct * mult, struct)
        desc = (is_desc & (subset == FN)).to(f32) * float(weights.rollout_fn_desc_weight)
        always = closure | is_eos
        struct = torch.where(always, 1.0, struct)
        desc = torch.where(closure, 0.0, desc)

    if segment_ids is not None:
        _check_shape("segment_ids", segment_ids, tt)
    if segment_ids is not None and content_checks(tt):
        supervised = (struct > 0) | (desc > 0)
        first = torch.ones_like(supervised)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        bad = supervised & (first | (segment_ids < 0))
        if bad.any():
            row, pos = torch.nonzero(bad)[0].tolist()
            raise ValueError(
                f"supervised token at row {row}, position {pos} is the first token of its segment "
                f"(segment_ids={int(segment_ids[row, pos])}) or padding: its logits would come from the "
                "previous segment. Every segment must start with prompt tokens typed IGNORE."
            )
    return TokenCEMasks(struct=struct, desc=desc, eos=is_eos)


def text_gate_positions(masks: TokenCEMasks) -> torch.Tensor:
    """[B, T] bool: struct/desc tokens with weight > 0, excluding the eos token (docs/training/METRICS_LOSSES.md text_gate)."""
    pos = (masks.struct > 0) | (masks.desc > 0)
    if masks.eos is not None:
        pos = pos & ~masks.eos
    return pos


def _check_shape(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of token_types {tuple(ref.shape)}, got {tuple(t.shape)}")


__all__ = ["TokenCEKnobs", "TokenCEMasks", "build_token_ce_weights", "text_gate_positions"]
