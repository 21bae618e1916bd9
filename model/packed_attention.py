"""Segment-wise SDPA for packed rows: ``model.attn_implementation: sdpa_packed``.

A packed row holds several samples; each attends only to itself (block-diagonal causal mask, built
by transformers from the text position ids restarting at 0 per sample; ``model/forward.py``). Plain
``sdpa`` gets that mask as a dense ``[B, 1, T, T]`` tensor, so the kernel computes every pair of
tokens in the row and throws most of them away: on a 512-token row of 4 samples about 4x the useful
work, and a masked kernel cannot skip the upper triangle either. ``sdpa_packed`` runs the decoder's
self-attention on the samples instead: their tokens are gathered into ``[segments, H, L, D]``
batches (segments of similar length share a batch, padded at the end: ``BUCKET_RATIO``), attention
runs with ``is_causal=True`` and no mask (which also lets the fast causal kernels run), and the
outputs are put back in row order. The result is the masked result up to float rounding, gradients
included (``tests/test_packed_attention.py``). On the tiny research model (one CPU thread, 4 samples
per 512-token row) a training forward + backward takes ~20 % less time.

It applies only where the segments are known: the training forwards of ``model.forward.HiddenStatesModel``
pass them (``SEGMENTS_KWARG``, computed once per forward from the position ids with transformers'
own ``find_packed_sequence_indices``, the rule its mask builder uses: a new segment wherever the
position does not continue the previous one by 1). Every other call (vision tower, generation with its KV cache and padding mask, the
prefix-reuse decode with its explicit mask) goes to transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "sdpa_packed"
SEGMENTS_KWARG = "coordexp_packed_segments"
# Segments whose lengths lie within this ratio of each other share one attention call (padded to the
# longest): at most ~1.56x the minimal work for any segment, and few calls per layer.
BUCKET_RATIO = 1.25


@dataclass(frozen=True)
class PackedSegments:
    """Where the samples of a ``[B, T]`` packed batch lie, grouped into attention calls.

    ``buckets``: per call ``(index [S, L] long, valid [S * L] bool)``: flat positions ``b * T + t`` of
    each segment's tokens (padded with 0 past its length) and which entries are real tokens.
    ``order`` ``[B * T]``: row ``order[p]`` of the buckets' concatenated real outputs is position ``p``.
    """

    buckets: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    order: torch.Tensor
    batch: int
    length: int


def packed_segments(text_position_ids: torch.Tensor) -> PackedSegments:
    """Segments of a packed batch from its text position ids ``[B, T]`` (one host copy)."""
    if text_position_ids.dim() != 2:
        raise ValueError(f"text position ids must be [B, T], got {tuple(text_position_ids.shape)}")
    from transformers.masking_utils import find_packed_sequence_indices

    b, t = text_position_ids.shape
    # transformers' own rule (the one its mask builder uses): sequence ids per token, None = one per row
    seq = find_packed_sequence_indices(text_position_ids.detach().to("cpu", torch.long))
    starts = torch.zeros(b, t, dtype=torch.bool)
    starts[:, 0] = True
    if seq is not None:
        starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    first = starts.reshape(-1).nonzero().reshape(-1)  # every row starts a segment: none spans two rows
    lengths = torch.diff(first, append=torch.tensor([b * t]))
    keys = torch.ceil(torch.log(lengths.double()) / math.log(BUCKET_RATIO)).long()
    buckets, placed = [], []
    for key in keys.unique().tolist():
        sel = (keys == key).nonzero().reshape(-1)
        seg_first, seg_len = first[sel], lengths[sel]
        steps = torch.arange(int(seg_len.max()))
        valid = steps[None, :] < seg_len[:, None]
        index = torch.where(valid, seg_first[:, None] + steps[None, :], 0)
        placed.append(index[valid])
        buckets.append((index.to(text_position_ids.device), valid.reshape(-1).to(text_position_ids.device)))
    order = torch.argsort(torch.cat(placed)).to(text_position_ids.device)
    return PackedSegments(tuple(buckets), order, b, t)


def sdpa_packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                  is_causal=None, **kwargs):
    """transformers attention interface: segment-wise causal SDPA when this call is a packed decoder
    self-attention (``SEGMENTS_KWARG`` given, causal module, no cache), else transformers' ``sdpa``.

    query ``[B, Hq, T, D]``, key / value ``[B, Hkv, T, D]`` -> (``[B, T, Hq, D]``, None), as ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seg = kwargs.pop(SEGMENTS_KWARG, None)
    b, hq, t, d = query.shape
    if (seg is None or not getattr(module, "is_causal", False) or key.shape[2] != t
            or (seg.batch, seg.length) != (b, t)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3]) for x in (query, key, value)]
    outs = []
    for index, valid in seg.buckets:
        q, k, v = (f[index].transpose(1, 2) for f in flat)  # [S, H, L, D]
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])
        outs.append(o.transpose(1, 2).reshape(-1, hq, d)[valid])
    return torch.cat(outs)[seg.order].reshape(b, t, hq, d), None


def register() -> None:
    """Make ``sdpa_packed`` a transformers attention implementation (idempotent): the attention above,
    and ``sdpa``'s mask builder for the calls it hands to ``sdpa``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
