"""Coord decode and straight-through bridges (docs/training/METRICS_LOSSES.md)."""

from __future__ import annotations

import pytest
import torch

from losses.coord import context_embeddings, coord_probs, decode_coords, expectation_decode, st_decode


def _two_bin_logits(a: int, b: int, la: float, lb: float) -> torch.Tensor:
    s = torch.full((1, 1000), -1e4)
    s[0, a], s[0, b] = la, lb
    return s


def test_expectation_decode_hand_values():
    # equal mass on bins 100 and 300 -> 200/999
    x = expectation_decode(_two_bin_logits(100, 300, 2.0, 2.0))
    torch.testing.assert_close(x, torch.tensor([200 / 999]))
    # p = (1, e) / (1 + e) on bins 0 and 999 -> e/(1+e)
    e = torch.e
    x = expectation_decode(_two_bin_logits(0, 999, 0.0, 1.0))
    torch.testing.assert_close(x, torch.tensor([e / (1 + e)]))
    # temperature 2 halves the logit gap: p(999) = e^0.5/(1+e^0.5)
    x = expectation_decode(_two_bin_logits(0, 999, 0.0, 1.0), temperature=2.0)
    torch.testing.assert_close(x, torch.tensor([e**0.5 / (1 + e**0.5)]))


def test_expectation_decode_equals_explicit_sum_on_random_logits():
    s = torch.randn(5, 1000, generator=torch.Generator().manual_seed(1)) * 3
    p = torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)
    ref = torch.stack([sum(p[i, k] * k / 999 for k in range(0, 1000, 1)) for i in range(5)])
    torch.testing.assert_close(expectation_decode(s), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(coord_probs(s).sum(-1), torch.ones(5))


def test_st_decode_forward_is_hard_and_gradient_is_expectations():
    s0 = torch.randn(4, 1000, generator=torch.Generator().manual_seed(2)) * 2
    s_st = s0.clone().requires_grad_(True)
    s_exp = s0.clone().requires_grad_(True)
    x_st = decode_coords(s_st, "st")
    x_exp = decode_coords(s_exp, "exp")
    torch.testing.assert_close(x_st, s0.argmax(-1).float() / 999)
    assert not torch.allclose(x_st, x_exp)
    up = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (x_st * up).sum().backward()
    (x_exp * up).sum().backward()
    torch.testing.assert_close(s_st.grad, s_exp.grad)
    assert s_st.grad.abs().sum() > 0
    torch.testing.assert_close(st_decode(s0, temperature=0.5), s0.argmax(-1).float() / 999)


def test_context_embeddings_soft_hard_st():
    g = torch.Generator().manual_seed(3)
    s0 = torch.randn(3, 1000, generator=g) * 2
    emb = torch.randn(1000, 6, generator=g)
    p = torch.softmax(s0, -1)
    soft = context_embeddings(s0, emb, "soft")
    hard = context_embeddings(s0, emb, "hard")
    torch.testing.assert_close(soft, p @ emb)
    torch.testing.assert_close(hard, emb[s0.argmax(-1)])

    s_st = s0.clone().requires_grad_(True)
    s_soft = s0.clone().requires_grad_(True)
    st = context_embeddings(s_st, emb, "st")
    sf = context_embeddings(s_soft, emb, "soft")
    torch.testing.assert_close(st, hard)
    assert not torch.allclose(st, sf)
    up = torch.randn(3, 6, generator=g)
    (st * up).sum().backward()
    (sf * up).sum().backward()
    torch.testing.assert_close(s_st.grad, s_soft.grad)


def test_unknown_modes_and_bad_inputs_raise():
    s = torch.zeros(1, 1000)
    with pytest.raises(ValueError, match="allowed: exp, st"):
        decode_coords(s, "argmax")
    with pytest.raises(ValueError, match="allowed: soft, st, hard"):
        context_embeddings(s, torch.zeros(1000, 2), "mean")
    with pytest.raises(ValueError, match="1000"):
        expectation_decode(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="temperature"):
        expectation_decode(s, temperature=0.0)
