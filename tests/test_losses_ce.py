"""Chunked token CE and LM-head projections on selected positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import losses.ce as ce_mod
from losses.ce import coord_logits, full_logsumexp, hidden_at_logit_pos, token_ce


def _setup(b=2, t=6, h=5, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (b, t), generator=g)
    weights = torch.zeros(b, t)
    weights[0, 1:4] = torch.tensor([1.0, 0.5, 2.0])
    weights[1, 2] = 1.0
    weights[1, t - 1] = 0.25
    return hidden, w, ids, weights


def _reference(hidden, w, ids, weights):
    logits = hidden @ w.t()  # full [B, T, V], fine for a tiny V
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, w.shape[0]), ids[:, 1:].reshape(-1), reduction="none")
    wt = weights[:, 1:].reshape(-1)
    return (wt * ce).sum() / wt.sum()


def test_token_ce_matches_full_logits_cross_entropy_and_gradients():
    hidden, w, ids, weights = _setup()
    mean, wsum = token_ce(hidden, w, ids, weights, chunk_size=2)
    ref = _reference(hidden, w, ids, weights)
    torch.testing.assert_close(mean, ref)
    assert wsum.item() == pytest.approx(4.75)
    g1 = torch.autograd.grad(mean, (hidden, w))
    g2 = torch.autograd.grad(ref, (hidden, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_token_ce_never_projects_more_than_chunk_size_rows(monkeypatch):
    hidden, w, ids, weights = _setup(b=3, t=9)
    weights = torch.rand(3, 9)
    weights[:, 0] = 0
    sizes = []
    real = ce_mod._project

    def spy(rows, weight):
        sizes.append(rows.shape[0])
        return real(rows, weight)

    monkeypatch.setattr(ce_mod, "_project", spy)
    mean, _ = token_ce(hidden, w, ids, weights, chunk_size=4)
    assert sizes and max(sizes) <= 4 and sum(sizes) == 24
    torch.testing.assert_close(mean, _reference(hidden, w, ids, weights))


def test_token_ce_is_mean_like_under_batch_duplication():
    hidden, w, ids, weights = _setup()
    a, _ = token_ce(hidden, w, ids, weights)
    b, wsum2 = token_ce(torch.cat([hidden, hidden]), w, torch.cat([ids, ids]), torch.cat([weights, weights]))
    torch.testing.assert_close(a, b)
    assert wsum2.item() == pytest.approx(9.5)


def test_token_ce_no_weight_is_zero_with_graph():
    hidden, w, ids, _ = _setup()
    mean, wsum = token_ce(hidden, w, ids, torch.zeros(2, 6))
    assert mean.item() == 0.0 and wsum.item() == 0.0
    mean.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_token_ce_rejects_weight_at_row_start():
    hidden, w, ids, weights = _setup()
    weights[1, 0] = 1.0
    with pytest.raises(ValueError, match="row 1, pos 0"):
        token_ce(hidden, w, ids, weights)


def test_hidden_at_logit_pos_and_projections():
    hidden, w, _, _ = _setup(b=2, t=4, h=3, v=1200)
    rows = hidden_at_logit_pos(hidden, torch.tensor([1, 7]))  # (row 0, pos 1) and (row 1, pos 3)
    torch.testing.assert_close(rows, torch.stack([hidden[0, 0], hidden[1, 2]]))
    full = rows @ w.t()
    torch.testing.assert_close(full_logsumexp(rows, w, chunk_size=1), torch.logsumexp(full, -1))
    ids = torch.arange(150, 1150)
    torch.testing.assert_close(coord_logits(rows, w, ids), full[:, 150:1150])
    assert full_logsumexp(rows[:0], w).shape == (0,)


@pytest.mark.parametrize("recompute", [True, False])
def test_token_ce_keeps_chunk_logits_for_backward_only_when_small(monkeypatch, recompute):
    """Chunks whose logits exceed ``RECOMPUTE_ABOVE_BYTES`` are recomputed in backward: autograd saves
    no ``[chunk, V]`` logits between passes. Smaller ones are kept (one LM-head matmul per chunk instead
    of two). Either way the gradient equals the plain full-logits CE's."""
    import losses.ce as ce_mod

    monkeypatch.setattr(ce_mod, "RECOMPUTE_ABOVE_BYTES", 16 * 3000 * 4 - 1 if recompute else 16 * 3000 * 4)
    # the last chunk (14 rows) is under either limit, so the limit is checked on the 16-row chunks only
    calls = []
    real = ce_mod._project
    monkeypatch.setattr(ce_mod, "_project", lambda rows, weight: calls.append(rows.shape[0]) or real(rows, weight))
    torch.manual_seed(0)
    B, T, H, V, chunk = 2, 40, 8, 3000, 16
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    w = torch.ones(B, T)
    w[:, 0] = 0
    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = token_ce(hidden, weight, ids, w, chunk_size=chunk)
    kept = [s for s in saved_shapes if s == (chunk, V)]
    assert saved_shapes and bool(kept) is not recompute
    loss.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    chunks = -(-(B * (T - 1)) // chunk)
    full = B * (T - 1) // chunk  # 16-row chunks; the 14-row last one is never recomputed here
    assert len(calls) == chunks + (full if recompute else 0)  # forward, plus the recomputes in backward

    hidden.grad = weight.grad = None
    logits = hidden[:, :-1].reshape(-1, H) @ weight.T
    ref = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, g_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, g_w, rtol=1e-4, atol=1e-6)


def test_bf16_lm_head_losses_are_computed_on_fp32_logits():
    """A bf16 head's logits are upcast before the softmax: CE and logsumexp equal the fp32 math on
    the same bf16 logits (a softmax in bf16 is off by ~1e-3 relative), and the outputs are fp32."""
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 2, 9, 32, 257
    hidden = (torch.randn(b, t, h, generator=g) * 2).to(torch.bfloat16)
    w = torch.randn(v, h, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, v, (b, t), generator=g)
    weights = torch.zeros(b, t)
    weights[:, 1:] = 1.0
    logits = (hidden @ w.t()).float()  # the bf16 matmul, then the upcast: what the loss must see
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    mean, _ = token_ce(hidden, w, ids, weights, chunk_size=4)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, ref, rtol=1e-6, atol=1e-6)
    rows = hidden.reshape(-1, h)
    lse = full_logsumexp(rows, w, chunk_size=5)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(logits.reshape(-1, v), -1), rtol=1e-6, atol=1e-6)
    text, full = ce_mod.text_and_full_logsumexp(rows, w, torch.arange(200, v), chunk_size=5)
    torch.testing.assert_close(text, torch.logsumexp(logits.reshape(-1, v)[:, :200], -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full, torch.logsumexp(logits.reshape(-1, v), -1), rtol=1e-6, atol=1e-6)
    coord = coord_logits(rows, w, torch.arange(200, v))
    assert coord.dtype == torch.float32
    torch.testing.assert_close(coord, logits.reshape(-1, v)[:, 200:], rtol=0, atol=0)
