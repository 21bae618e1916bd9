"""Token CE and LM-head projections on selected positions only.

Never builds ``[B, T, V]`` logits: the supervised positions are gathered first and
projected through the LM head ``chunk_size`` rows at a time (Qwen3-VL's V is ~152k; a
4k-token row of fp32 logits is ~2.5 GB). Logits are upcast to fp32 after the matmul.
Under autograd each chunk is recomputed in backward (activation checkpointing), so no
chunk's ``[chunk, V]`` logits stay alive between forward and backward: peak memory is one
chunk, whatever the number of supervised tokens, for one extra LM-head matmul per chunk. A chunk
whose fp32 logits are at most ``RECOMPUTE_ABOVE_BYTES`` (16 MiB: ~27 rows of Qwen3-VL's vocabulary,
a whole 512-token row of the tiny model's) is kept instead: recomputing it would save no memory
worth its matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losses.checks import content_checks

_EPS = 1e-8
RECOMPUTE_ABOVE_BYTES = 16 * 2**20


def _project(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[n, H] x [V, H] -> [n, V] fp32 logits. The only place the LM head is applied (tests hook it).

    The matmul runs in the head's dtype (or the autocast dtype when autocast is on), whatever the
    rows' dtype: accelerate's mixed-precision wrapper hands back fp32 hidden states while a bf16 /
    fp16 head stays half. The rows are cast (cheap, differentiable), never the ``[V, H]`` head.
    """
    if rows.dtype != weight.dtype:
        rows = rows.to(weight.dtype)
    return (rows @ weight.t()).float()


def hidden_at_logit_pos(hidden: torch.Tensor, token_pos: torch.Tensor) -> torch.Tensor:
    """Hidden rows that predict the tokens at flat positions ``token_pos``.

    hidden     [B, T, H]
    token_pos  [N] long, flat token positions ``row * T + pos`` (pos >= 1)
    returns    [N, H], the hidden state at the logit position ``token_pos - 1``
    """
    b, t, h = hidden.shape
    token_pos = token_pos.to(torch.long).reshape(-1)
    if token_pos.numel() and content_checks(token_pos) and bool(((token_pos % t) == 0).any() | (token_pos < 0).any() | (token_pos >= b * t).any()):
        bad = token_pos[((token_pos % t) == 0) | (token_pos < 0) | (token_pos >= b * t)][0].item()
        raise ValueError(
            f"token position {bad} (row {bad // t}, pos {bad % t}) has no logit position inside its row "
            f"(grid {b}x{t}); token positions must satisfy 1 <= pos < T"
        )
    return hidden.reshape(b * t, h).index_select(0, token_pos - 1)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunk_ce(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_project(rows, weight), targets, reduction="none")


def _chunk_lse(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(_project(rows, weight), dim=-1)


def _recomputed(fn, rows: torch.Tensor, weight: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """``fn(rows, weight, *args)``, recomputed in backward instead of keeping its ``[chunk, V]``
    intermediates, unless those fp32 logits are at most ``RECOMPUTE_ABOVE_BYTES``."""
    if _needs_grad(rows, weight, *args) and rows.shape[0] * weight.shape[0] * 4 > RECOMPUTE_ABOVE_BYTES:
        return checkpoint(fn, rows, weight, *args, use_reentrant=False)
    return fn(rows, weight, *args)


def token_ce(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean next-token CE over the positions with weight > 0.

    hidden          [B, T, H] final (normed) hidden states
    lm_head_weight  [V, H]
    input_ids       [B, T] long; the target of position j is input_ids[j], logits from j - 1
    weights         [B, T] float per-token weights (token-position aligned)
    returns (mean, weight_sum): mean = sum(w * CE) / max(sum(w), eps) (scalar, fp32, nats);
    weight_sum is detached. With no positive weight, mean is an exact 0 that still carries
    the graph of ``hidden`` so backward() works on every rank.
    """
    if weights.shape != input_ids.shape or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"weights {tuple(weights.shape)}; expected [B, T, H], [B, T], [B, T]"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_w = weights.reshape(-1).float()
    pos = torch.nonzero(flat_w > 0).reshape(-1)
    if pos.numel() == 0:
        zero = hidden.sum() * 0.0
        return zero.float(), flat_w.new_zeros(())
    targets = input_ids.reshape(-1).index_select(0, pos)
    w = flat_w.index_select(0, pos)
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, pos.numel(), chunk_size):
        sl = slice(lo, lo + chunk_size)
        rows = hidden_at_logit_pos(hidden, pos[sl])
        ce = _recomputed(_chunk_ce, rows, lm_head_weight, targets[sl])
        total = total + (w[sl] * ce).sum()
    wsum = w.sum()
    return total / wsum.clamp_min(_EPS), wsum.detach()


def _chunk_text_and_full_lse(rows: torch.Tensor, weight: torch.Tensor, coord_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _project(rows, weight)
    text = torch.logsumexp(logits.index_fill(-1, coord_ids, float("-inf")), dim=-1)
    return text, torch.logsumexp(logits, dim=-1)


def _chunked(fn, n_out: int, hidden_rows: torch.Tensor, chunk_size: int, *args: torch.Tensor) -> list[torch.Tensor]:
    """``fn(rows_chunk, *args)`` over ``chunk_size``-row chunks; its ``n_out`` outputs, each concatenated to [N]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    outs = [
        _recomputed(fn, hidden_rows[lo : lo + chunk_size], *args)
        for lo in range(0, hidden_rows.shape[0], chunk_size)
    ]
    outs = [(o,) if isinstance(o, torch.Tensor) else tuple(o) for o in outs]
    if not outs:
        return [hidden_rows.new_zeros((0,), dtype=torch.float32) + hidden_rows.sum() * 0.0 for _ in range(n_out)]
    return [torch.cat(parts) for parts in zip(*outs)]


def full_logsumexp(hidden_rows: torch.Tensor, lm_head_weight: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """[N, H] -> [N] fp32 logsumexp over the full vocabulary, ``chunk_size`` rows at a time."""
    return _chunked(_chunk_lse, 1, hidden_rows, chunk_size, lm_head_weight)[0]


def text_and_full_logsumexp(
    hidden_rows: torch.Tensor, lm_head_weight: torch.Tensor, coord_token_ids: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H] -> (text_lse [N], full_lse [N]) fp32, ``chunk_size`` rows at a time.

    ``text_lse`` is the logsumexp over every vocabulary entry *except* the coord tokens, so
    ``text_lse - full_lse`` is the log of the non-coord mass computed directly: no ``1 - p_coord``
    cancellation when nearly all mass sits on coord tokens (``losses.coord_reg.text_gate``).
    """
    ids = coord_token_ids.to(device=lm_head_weight.device, dtype=torch.long).reshape(-1)
    text, full = _chunked(_chunk_text_and_full_lse, 2, hidden_rows, chunk_size, lm_head_weight, ids)
    return text, full


def coord_logits(hidden_rows: torch.Tensor, lm_head_weight: torch.Tensor, coord_token_ids: torch.Tensor) -> torch.Tensor:
    """[N, H] -> [N, K] fp32 logits of the coord tokens only (K = len(coord_token_ids), 1000).

    Column k is the logit of ``<|coord_k|>``: ``coord_token_ids`` must be ordered by bin.
    """
    ids = coord_token_ids.to(device=lm_head_weight.device, dtype=torch.long).reshape(-1)
    return _project(hidden_rows, lm_head_weight.index_select(0, ids))
