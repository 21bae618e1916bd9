"""Coord decode (expectation / straight-through) and coord-slot context embeddings (docs/training/METRICS_LOSSES.md).

``coord_logits`` are ``[N, 1000]``: column k is the logit of ``<|coord_k|>`` at a coord
*output* position. Bin values are fractions ``v_k = k / 999``.
"""

from __future__ import annotations

import torch

from core.vocab import DECODE_MODES, EMBED_MODES, NUM_COORD_BINS  # noqa: E402,F401  (re-exported)


def _check(coord_logits: torch.Tensor, temperature: float) -> None:
    if coord_logits.shape[-1] != NUM_COORD_BINS:
        raise ValueError(f"coord_logits last dim must be {NUM_COORD_BINS}, got shape {tuple(coord_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def bin_values(device=None, dtype=torch.float32) -> torch.Tensor:
    """[1000] fractions k/999."""
    return torch.arange(NUM_COORD_BINS, device=device, dtype=dtype) / (NUM_COORD_BINS - 1)


def coord_probs(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, 1000] -> [N, 1000] softmax(s / τ) in fp32."""
    _check(coord_logits, temperature)
    return torch.softmax(coord_logits.float() / temperature, dim=-1)


def expectation_decode(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, 1000] -> [N] fractions Σ_k p_k k/999, in fp32 also under autocast.

    An elementwise product and a sum, not ``p @ bins``: autocast would run the matmul in bf16,
    whose 8-bit mantissa rounds the expectation by up to ~4 bins.
    """
    p = coord_probs(coord_logits, temperature)
    return (p * bin_values(p.device, p.dtype)).sum(dim=-1)


def st_decode(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, 1000] -> [N] fractions: forward argmax/999, gradient of the expectation."""
    x_exp = expectation_decode(coord_logits, temperature)
    hard = coord_logits.argmax(dim=-1).to(x_exp.dtype) / (NUM_COORD_BINS - 1)
    return hard + (x_exp - x_exp.detach())


def decode_coords(coord_logits: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """[N, 1000] -> [N] fractions with ``mode`` in {"exp", "st"} (``*.coord_decode_mode``)."""
    if mode == "exp":
        return expectation_decode(coord_logits, temperature)
    if mode == "st":
        return st_decode(coord_logits, temperature)
    raise ValueError(f"coord decode mode {mode!r} unknown; allowed: {', '.join(DECODE_MODES)}")


def context_embeddings(
    coord_logits: torch.Tensor, coord_embed_rows: torch.Tensor, mode: str, temperature: float = 1.0
) -> torch.Tensor:
    """Embeddings to feed at coord input slots (Channel-A, ``stage2_ab.coord_ctx_embed_mode``).

    coord_logits      [N, 1000]
    coord_embed_rows  [1000, H] coord rows of the input embedding table, ordered by bin
    returns           [N, H] in the dtype of ``coord_embed_rows``:
                      soft = p @ E; hard = E[argmax]; st = hard + (soft - stopgrad(soft))
    """
    if mode not in EMBED_MODES:
        raise ValueError(f"coord context embedding mode {mode!r} unknown; allowed: {', '.join(EMBED_MODES)}")
    _check(coord_logits, temperature)
    if coord_embed_rows.shape[0] != NUM_COORD_BINS:
        raise ValueError(f"coord_embed_rows must be [{NUM_COORD_BINS}, H], got {tuple(coord_embed_rows.shape)}")
    hard = coord_embed_rows.index_select(0, coord_logits.argmax(dim=-1))
    if mode == "hard":
        return hard
    p = coord_probs(coord_logits, temperature).to(coord_embed_rows.dtype)
    soft = (p @ coord_embed_rows).to(coord_embed_rows.dtype)  # autocast may return the matmul in bf16
    if mode == "soft":
        return soft
    return hard + (soft - soft.detach())
