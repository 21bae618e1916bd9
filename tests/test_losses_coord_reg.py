"""coord_reg sub-terms and gates against hand-computed values (docs/training/METRICS_LOSSES.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses.ce import coord_logits, full_logsumexp
from losses.coord_reg import (
    coord_ce,
    coord_gate,
    entropy,
    expected_huber,
    expected_l1,
    gaussian_targets,
    soft_ce,
    text_gate,
    w1,
)

BIG = 1e4


def _mass(bins_weights: dict[int, float]) -> torch.Tensor:
    """[1, 1000] logits putting probability proportional to the given weights on those bins."""
    s = torch.full((1, 1000), -BIG)
    for k, w in bins_weights.items():
        s[0, k] = math.log(w)
    return s


def test_gaussian_targets_shape_truncation_and_values():
    q = gaussian_targets(torch.tensor([500, 0, 999]), sigma=2.0, truncate=1)
    assert q.shape == (3, 1000)
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    a = math.exp(-1 / 8)
    torch.testing.assert_close(q[0, 499:502], torch.tensor([a, 1.0, a]) / (1 + 2 * a))
    assert q[0, :499].sum() == 0 and q[0, 502:].sum() == 0
    torch.testing.assert_close(q[1, :2], torch.tensor([1.0, a]) / (1 + a))  # clipped at the edge
    assert q[1, 2:].sum() == 0 and q[2, :998].sum() == 0
    # no truncation: the tail is small but not zero; σ tiny degrades to one-hot
    q_full = gaussian_targets(torch.tensor([500]), sigma=2.0)
    assert (q_full[0] > 0).sum() > 3
    onehot = gaussian_targets(torch.tensor([7]), sigma=1e-4)
    assert onehot[0, 7] == 1.0 and onehot.sum() == 1.0
    with pytest.raises(ValueError, match="target_sigma"):
        gaussian_targets(torch.tensor([1]), sigma=0.0)
    with pytest.raises(ValueError, match="target_truncate"):
        gaussian_targets(torch.tensor([1]), truncate=-1)


def test_soft_ce_hand_values():
    # uniform p: −Σ q log(1/1000) = log 1000 whatever q is
    assert soft_ce(torch.zeros(1, 1000), torch.tensor([500]), 2.0, 1).item() == pytest.approx(math.log(1000), rel=1e-5)
    # truncate 0 -> one-hot target -> equals hard coord CE
    s = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 5, 500, 999])
    torch.testing.assert_close(soft_ce(s, t, 2.0, 0), coord_ce(s, t))
    # p = 1/2 on bins 499 and 501, target t=500 truncated at 1: only q_499, q_501 meet finite log p
    a = math.exp(-1 / 8)
    q_side = a / (1 + 2 * a)
    s2 = _mass({499: 1.0, 501: 1.0})
    got = soft_ce(s2, torch.tensor([500]), 2.0, 1)
    expected = 2 * q_side * math.log(2) + (1 / (1 + 2 * a)) * (BIG + math.log(2))
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_w1_known_pairs():
    # point mass at 10 vs one-hot target at 13: |CDF diff| = 1 on bins 10..12 -> 3/999
    assert w1(_mass({10: 1.0}), torch.tensor([13]), 2.0, 0).item() == pytest.approx(3 / 999, rel=1e-4)
    # half at 10, half at 20 vs target 14: 0.5 on 4 bins + 0.5 on 6 bins -> 5/999
    assert w1(_mass({10: 1.0, 20: 1.0}), torch.tensor([14]), 2.0, 0).item() == pytest.approx(5 / 999, rel=1e-4)
    # Gaussian target symmetric around p's point mass, truncate 1: CDF diff q_side on bins 499 and 500
    a = math.exp(-1 / 8)
    q_side = a / (1 + 2 * a)
    assert w1(_mass({500: 1.0}), torch.tensor([500]), 2.0, 1).item() == pytest.approx(2 * q_side / 999, rel=1e-4)


def test_entropy_and_expected_distances():
    assert entropy(_mass({3: 1.0, 9: 1.0})).item() == pytest.approx(math.log(2), rel=1e-5)
    assert entropy(torch.zeros(1, 1000)).item() == pytest.approx(math.log(1000), rel=1e-5)
    # temperature 2 on logits (0, log 4) -> p = (1/3, 2/3)
    s = _mass({0: 1.0, 1: 4.0})
    p = torch.tensor([1 / 3, 2 / 3])
    assert entropy(s, temperature=2.0).item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)

    pair = _mass({10: 1.0, 20: 1.0})
    assert expected_l1(pair, torch.tensor([14])).item() == pytest.approx((0.5 * 4 + 0.5 * 6) / 999, rel=1e-5)
    delta = 0.001
    exp_h = 0.5 * delta * (4 / 999 - delta / 2) + 0.5 * delta * (6 / 999 - delta / 2)
    assert expected_huber(pair, torch.tensor([14]), delta=delta).item() == pytest.approx(exp_h, rel=1e-4)
    # inside δ the Huber term is quadratic: one bin away with δ = 0.01 -> ½(1/999)²
    quad = expected_huber(_mass({15: 1.0}), torch.tensor([14]), delta=0.01).item()
    assert quad == pytest.approx(0.5 * (1 / 999) ** 2, rel=1e-4)


def test_gates_on_known_logit_vector():
    # 1000 coord logits of 0 (mass 1000) and 3 text logits of log(1000) (mass 3000) -> p_coord = 1/4
    full = torch.cat([torch.full((3,), math.log(1000.0)), torch.zeros(1000)])
    coord_lse = torch.logsumexp(full[3:], 0).reshape(1)
    full_lse = torch.logsumexp(full, 0).reshape(1)
    assert coord_gate(coord_lse, full_lse).item() == pytest.approx(-math.log(0.25 + 1e-6), rel=1e-5)
    text_lse = torch.logsumexp(full[:3], 0).reshape(1)
    assert text_gate(text_lse, full_lse).item() == pytest.approx(-math.log(0.75 + 1e-6), rel=1e-5)
    assert text_gate(text_lse, full_lse, eps=0).item() == pytest.approx(math.log(4 / 3), rel=1e-5)
    assert coord_gate(coord_lse, full_lse, eps=0).item() == pytest.approx(math.log(4), rel=1e-5)
    # all mass on coords (no text mass at all): text gate is −log(eps), finite
    assert text_gate(torch.tensor([float("-inf")]), torch.tensor([5.0])).item() == pytest.approx(-math.log(1e-6), rel=1e-5)


def _text_gate_float64(hidden_rows: torch.Tensor, w: torch.Tensor, coord_ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Independent reference in float64: −log(Σ_text softmax + eps) from the full logit matrix."""
    logits = hidden_rows.double() @ w.double().t()
    text = torch.ones(w.shape[0], dtype=torch.bool)
    text[coord_ids] = False
    p_text = torch.softmax(logits, dim=-1)[:, text].sum(-1)
    return -torch.log(p_text + eps)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_text_gate_keeps_precision_when_coord_mass_is_near_one(eps):
    """1 − p_coord from 1e-4 down to 1e-9 on a realistic LM head (logits ~ 40): the old
    log(1 − exp(coord_lse − full_lse)) in fp32 was off by up to ~1 nat here."""
    from losses.ce import text_and_full_logsumexp

    g = torch.Generator().manual_seed(0)
    V, H, n_text = 1300, 16, 300
    coord_ids = torch.arange(n_text, V)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.05
    w[:, 0] = 1.0  # a shared offset: every logit ~ +48, as in a real LM head (large logsumexps)
    w[:, 1] = 0.0
    w[n_text:, 1] = 1.0  # lifts the coord logits only
    h64 = torch.randn(5, H, generator=g, dtype=torch.float64)
    h64[:, 0] = 48.0
    h64[:, 1] = torch.tensor([8.5, 9.5, 10.5, 11.5, 12.5], dtype=torch.float64)
    ref = _text_gate_float64(h64, w, coord_ids, eps)
    logits = h64 @ w.t()
    text_mass = torch.softmax(logits, -1)[:, :n_text].sum(-1)
    assert float(text_mass.max()) < 1e-4 and float(text_mass.min()) > 0  # the regime of the fix

    h = h64.float().requires_grad_(True)
    wf = w.float()
    text_lse, full_lse = text_and_full_logsumexp(h, wf, coord_ids, chunk_size=2)
    got = text_gate(text_lse, full_lse, eps=eps)
    # reference on the fp32-rounded inputs, so only the math is compared
    h_ref = h.detach().double().requires_grad_(True)
    ref = _text_gate_float64(h_ref, wf.double(), coord_ids, eps)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=2e-5)
    g_got = torch.autograd.grad(got.sum(), h)[0]
    g_ref = torch.autograd.grad(ref.sum(), h_ref)[0]
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-3, atol=1e-4)

    # What the 1 − p_coord formulation gives on the same fp32 logits: visibly wrong (the bug).
    coord_lse = torch.logsumexp((h.detach() @ wf.t())[:, n_text:], -1)
    old = -torch.log(-torch.expm1((coord_lse - full_lse.detach()).clamp_max(0.0)) + eps) if eps else None
    if old is not None:
        assert float((old.double() - ref.detach()).abs().max()) > 0.03


def test_text_gate_mixed_regime_matches_reference_with_gradients():
    from losses.ce import text_and_full_logsumexp

    g = torch.Generator().manual_seed(3)
    coord_ids = torch.arange(7, 1007)
    w = torch.randn(1007, 8, generator=g)
    h = (torch.randn(9, 8, generator=g) * 3).requires_grad_(True)
    got = text_gate(*text_and_full_logsumexp(h, w, coord_ids, chunk_size=4))
    h_ref = h.detach().double().requires_grad_(True)
    ref = _text_gate_float64(h_ref, w.double(), coord_ids, 1e-6)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0].double(),
                               torch.autograd.grad(ref.sum(), h_ref)[0], rtol=1e-4, atol=1e-5)


def test_text_and_full_logsumexp_is_chunked_and_never_projects_more_rows(monkeypatch):
    """Each LM-head projection sees at most chunk_size rows (no [N, V] logits for all rows at once)."""
    import losses.ce as ce

    seen = []
    real = ce._project

    def spy(rows, weight):
        seen.append(rows.shape[0])
        return real(rows, weight)

    monkeypatch.setattr(ce, "_project", spy)
    h = torch.randn(7, 4)
    w = torch.randn(1010, 4)
    text, full = ce.text_and_full_logsumexp(h, w, torch.arange(10, 1010), chunk_size=3)
    assert seen == [3, 3, 1] and text.shape == full.shape == (7,)
    torch.testing.assert_close(full, torch.logsumexp(h @ w.t(), -1))
    torch.testing.assert_close(text, torch.logsumexp((h @ w.t())[:, :10], -1))
    empty = ce.text_and_full_logsumexp(h[:0], w, torch.arange(10, 1010))
    assert [t.shape for t in empty] == [(0,), (0,)]


def test_coord_ce_plus_coord_gate_equals_full_vocab_ce():
    g = torch.Generator().manual_seed(4)
    hidden_rows = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(1013, 8, generator=g)
    coord_ids = torch.arange(13, 1013)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    s = coord_logits(hidden_rows, w, coord_ids)
    total = coord_ce(s, t) + coord_gate(torch.logsumexp(s, -1), full_logsumexp(hidden_rows, w), eps=0)
    ref = F.cross_entropy(hidden_rows @ w.t(), coord_ids[t], reduction="none")
    torch.testing.assert_close(total, ref)
    g1 = torch.autograd.grad(total.sum(), hidden_rows)[0]
    g2 = torch.autograd.grad(ref.sum(), hidden_rows)[0]
    torch.testing.assert_close(g1, g2)


def test_terms_finite_with_extreme_logits_and_validate_inputs():
    s = _mass({0: 1.0}).repeat(2, 1).requires_grad_(True)
    t = torch.tensor([999, 0])
    vals = [soft_ce(s, t, 2.0, 3), w1(s, t, 2.0, None), entropy(s), expected_l1(s, t), expected_huber(s, t)]
    total = sum(v.sum() for v in vals)
    total.backward()
    assert all(torch.isfinite(v).all() for v in vals) and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="0..999"):
        coord_ce(torch.zeros(1, 1000), torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"\[N, 1000\]"):
        entropy(torch.zeros(1, 999))
