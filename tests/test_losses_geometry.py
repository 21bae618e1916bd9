"""SmoothL1 + CIoU geometry loss against hand-computed values (docs/training/METRICS_LOSSES.md)."""

from __future__ import annotations

import math

import pytest
import torch

from losses.geometry import SMOOTHL1_BETA, bbox_geo_loss, canonicalize_boxes, ciou, smooth_l1_per_box


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_smooth_l1_hand_values():
    assert SMOOTHL1_BETA == 0.01
    pred = _t([0.1, 0.2, 0.3, 0.4])
    target = _t([0.105, 0.2, 0.33, 0.5])
    # |d| = 0.005 (< β: 0.5·0.005²/0.01 = 0.00125), 0, 0.03 (0.03 − 0.005), 0.1 (0.1 − 0.005)
    expected = (0.00125 + 0.0 + 0.025 + 0.095) / 4
    assert smooth_l1_per_box(pred, target).item() == pytest.approx(expected, rel=1e-4)


def test_canonicalize_swaps_and_pads():
    out = canonicalize_boxes(_t([0.4, 0.6, 0.1, 0.2], [0.3, 0.3, 0.3, 0.3]), eps=1e-3)
    torch.testing.assert_close(out, _t([0.1, 0.2, 0.4, 0.6], [0.3, 0.3, 0.301, 0.301]))


def test_ciou_identical_disjoint_nested():
    # identical: IoU = 1 (up to eps), no centre distance, no aspect term
    assert ciou(_t([0.1, 0.2, 0.5, 0.6]), _t([0.1, 0.2, 0.5, 0.6])).item() == pytest.approx(1.0, abs=1e-5)
    # disjoint equal squares 0.4 apart: IoU 0, ρ² = 0.16, c² = 0.6² + 0.2² = 0.4 -> −0.4
    assert ciou(_t([0, 0, 0.2, 0.2]), _t([0.4, 0, 0.6, 0.2])).item() == pytest.approx(-0.4, abs=1e-5)
    # concentric nested squares: IoU = 0.04 / 0.36
    assert ciou(_t([0.2, 0.2, 0.4, 0.4]), _t([0, 0, 0.6, 0.6])).item() == pytest.approx(1 / 9, abs=1e-5)
    # nested in a corner, different aspect: IoU = 0.02/0.16, ρ² = 0.1² + 0.15², c² = 0.32,
    # v = 4/π²(atan(1) − atan(2))², α = v/(1 − IoU + v)
    iou = 0.125
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    alpha = v / (1 - iou + v)
    expected = iou - (0.01 + 0.0225) / 0.32 - alpha * v
    assert ciou(_t([0, 0, 0.2, 0.1]), _t([0, 0, 0.4, 0.4])).item() == pytest.approx(expected, abs=1e-5)


def test_ciou_zero_area_boxes():
    # zero-width line centred in a square: IoU ≈ 0, ρ = 0, v = 4/π²(π/4 − 0)² = 1/4, α = 0.25/1.25
    pred = canonicalize_boxes(_t([0.3, 0.2, 0.3, 0.4]))
    got = ciou(pred, _t([0.2, 0.2, 0.4, 0.4])).item()
    assert got == pytest.approx(-0.2 * 0.25, abs=1e-4)
    # a point at the centre of a square: everything ≈ 0
    pt = canonicalize_boxes(_t([0.3, 0.3, 0.3, 0.3]))
    assert ciou(pt, _t([0.2, 0.2, 0.4, 0.4])).item() == pytest.approx(0.0, abs=1e-4)
    # raw zero-area boxes (no canonicalisation) stay finite too
    assert torch.isfinite(ciou(_t([0.3, 0.3, 0.3, 0.3]), _t([0.3, 0.3, 0.3, 0.3]))).all()


CASES = {
    "identical": ([0.1, 0.2, 0.5, 0.6], [0.1, 0.2, 0.5, 0.6]),
    "disjoint": ([0.0, 0.0, 0.2, 0.2], [0.4, 0.0, 0.6, 0.2]),
    "nested": ([0.2, 0.2, 0.4, 0.4], [0.0, 0.0, 0.6, 0.6]),
    "swapped": ([0.5, 0.6, 0.1, 0.2], [0.1, 0.2, 0.5, 0.6]),
    "zero_area_pred": ([0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.4, 0.4]),
    "zero_area_both": ([0.3, 0.3, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]),
    "zero_width": ([0.3, 0.2, 0.3, 0.4], [0.2, 0.2, 0.4, 0.4]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_geo_loss_finite_values_and_gradients(name):
    p, t = CASES[name]
    pred = _t(p).requires_grad_(True)
    out = bbox_geo_loss(pred, _t(t))
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(pred.grad).all()
    assert 0.0 <= out.ciou.item() <= 2.5


def test_swapped_corners_equal_canonical_prediction():
    a = bbox_geo_loss(_t(CASES["swapped"][0]), _t(CASES["swapped"][1]))
    assert a.ciou.item() == pytest.approx(0.0, abs=1e-5)
    assert a.smoothl1.item() == pytest.approx(0.0, abs=1e-7)


def test_bbox_geo_loss_weights_and_means():
    pred = _t([0, 0, 0.2, 0.2], [0.1, 0.2, 0.5, 0.6])
    target = _t([0.4, 0, 0.6, 0.2], [0.1, 0.2, 0.5, 0.6])
    out = bbox_geo_loss(pred, target, smoothl1_weight=2.0, ciou_weight=0.5)
    # box 0: SmoothL1 = (0.395 + 0 + 0.395 + 0)/4, 1 − CIoU = 1.4; box 1: zeros
    sl1 = (0.1975 + 0.0) / 2
    one_minus = (1.4 + 0.0) / 2
    assert out.smoothl1.item() == pytest.approx(sl1, abs=1e-5)
    assert out.ciou.item() == pytest.approx(one_minus, abs=1e-5)
    assert out.total.item() == pytest.approx(2.0 * sl1 + 0.5 * one_minus, abs=1e-5)
    # mean-like: duplicating the boxes leaves every value unchanged
    dup = bbox_geo_loss(torch.cat([pred, pred]), torch.cat([target, target]), 2.0, 0.5)
    torch.testing.assert_close(dup.total, out.total)


def test_bbox_geo_loss_empty_is_zero_with_graph():
    pred = torch.zeros(0, 4, requires_grad=True)
    out = bbox_geo_loss(pred, torch.zeros(0, 4))
    assert out.total.item() == 0.0 and out.smoothl1.item() == 0.0 and out.ciou.item() == 0.0
    out.total.backward()
    assert pred.grad is not None
    with pytest.raises(ValueError, match=r"\[G, 4\]"):
        bbox_geo_loss(torch.zeros(2, 4), torch.zeros(3, 4))


def test_ciou_boxes_separated_vertically_non_square():
    # pred 0.2 x 0.3 above a 0.4 x 0.2 GT, no overlap: IoU 0; centres (0.2, 0.15) and (0.3, 0.6):
    # ρ² = 0.1² + 0.45² = 0.2125; enclosing box 0.4 x 0.7: c² = 0.65;
    # v = 4/π² (atan(0.4/0.2) − atan(0.2/0.3))², α = v / (1 − 0 + v)
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(2 / 3)) ** 2
    alpha = v / (1 + v)
    expected = 0.0 - 0.2125 / 0.65 - alpha * v
    got = ciou(_t([0.1, 0.0, 0.3, 0.3]), _t([0.1, 0.5, 0.5, 0.7])).item()
    assert got == pytest.approx(expected, abs=1e-6)
    # overlapping, offset vertically (pred 0.2 x 0.4 inside the GT's x range): inter 0.2 x 0.15 = 0.03,
    # union 0.08 + 0.08 − 0.03 = 0.13; centres (0.3, 0.3) and (0.3, 0.45): ρ² = 0.0225;
    # enclosing 0.4 x 0.45: c² = 0.3625; v = 4/π² (atan(0.4/0.2) − atan(0.2/0.4))²
    iou = 0.03 / 0.13
    v = 4 / math.pi**2 * (math.atan(2.0) - math.atan(0.5)) ** 2
    alpha = v / (1 - iou + v)
    expected = iou - 0.0225 / 0.3625 - alpha * v
    got = ciou(_t([0.2, 0.1, 0.4, 0.5]), _t([0.1, 0.35, 0.5, 0.55])).item()
    assert got == pytest.approx(expected, abs=1e-6)


def _ciou_reference(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """CIoU written from its definition (float64, no eps), α detached (a constant weight)."""
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    iw = (torch.min(p[:, 2], g[:, 2]) - torch.max(p[:, 0], g[:, 0])).clamp_min(0)
    ih = (torch.min(p[:, 3], g[:, 3]) - torch.max(p[:, 1], g[:, 1])).clamp_min(0)
    iou = iw * ih / (pw * ph + gw * gh - iw * ih)
    pc = torch.stack([(p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2], -1)
    gc = torch.stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2], -1)
    rho2 = ((pc - gc) ** 2).sum(-1)
    cw = torch.max(p[:, 2], g[:, 2]) - torch.min(p[:, 0], g[:, 0])
    ch = torch.max(p[:, 3], g[:, 3]) - torch.min(p[:, 1], g[:, 1])
    v = 4 / math.pi**2 * (torch.atan(gw / gh) - torch.atan(pw / ph)) ** 2
    alpha = (v / (1 - iou + v)).detach()
    return iou - rho2 / (cw**2 + ch**2) - alpha * v


def test_ciou_values_and_gradient_equal_the_reference_with_alpha_held_constant():
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.5
    size = 0.05 + torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.45
    glo = torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.5
    gsize = 0.05 + torch.rand(16, 2, generator=g, dtype=torch.float64) * 0.45
    pred = torch.cat([lo, lo + size], -1).requires_grad_(True)
    target = torch.cat([glo, glo + gsize], -1)
    got = ciou(pred, target, eps=1e-12)
    ref = _ciou_reference(pred, target)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad(got.sum(), pred)
    (grad_ref,) = torch.autograd.grad(ref.sum(), pred)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-9)
