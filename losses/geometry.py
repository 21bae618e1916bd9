"""Box geometry losses on decoded continuous boxes (docs/training/METRICS_LOSSES.md).

Boxes are ``[G, 4]`` fractions ``(x1, y1, x2, y2)`` of the image size (bin / 999).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# SmoothL1 transition point in fraction units: 0.01 of the image side ≈ 10 bins. Below it the
# loss is quadratic (gentle near convergence), above it linear (robust to wild early boxes).
SMOOTHL1_BETA = 0.01


def canonicalize_boxes(boxes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[G, 4] -> [G, 4]: x_lo=min(x1,x2), x_hi=max(max(x1,x2), x_lo+eps), same for y. Differentiable."""
    x_lo = torch.minimum(boxes[..., 0], boxes[..., 2])
    x_hi = torch.maximum(torch.maximum(boxes[..., 0], boxes[..., 2]), x_lo + eps)
    y_lo = torch.minimum(boxes[..., 1], boxes[..., 3])
    y_hi = torch.maximum(torch.maximum(boxes[..., 1], boxes[..., 3]), y_lo + eps)
    return torch.stack([x_lo, y_lo, x_hi, y_hi], dim=-1)


def smooth_l1_per_box(pred: torch.Tensor, target: torch.Tensor, beta: float = SMOOTHL1_BETA) -> torch.Tensor:
    """[G, 4], [G, 4] -> [G]: mean over the 4 coords of 0.5 d²/β if |d| < β else |d| − β/2 (fractions)."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(dim=-1)


def ciou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[G, 4], [G, 4] canonical boxes -> [G] Complete-IoU in [-1.5, 1] (approx.).

    CIoU = IoU − ρ²/c² − αv, v = 4/π² (atan(w_gt/h_gt) − atan(w/h))², α = v / (1 − IoU + v + eps).
    α is computed under no_grad (treated as a constant weight, as in the CIoU paper's reference
    implementation and torchvision), so the aspect term's gradient flows through v only.
    Widths/heights are clamped to >= eps and every denominator carries eps, so identical,
    disjoint, nested and zero-area boxes give finite values and gradients.
    """
    px1, py1, px2, py2 = pred.unbind(-1)
    gx1, gy1, gx2, gy2 = target.unbind(-1)
    pw = (px2 - px1).clamp_min(eps)
    ph = (py2 - py1).clamp_min(eps)
    gw = (gx2 - gx1).clamp_min(eps)
    gh = (gy2 - gy1).clamp_min(eps)
    iw = (torch.minimum(px2, gx2) - torch.maximum(px1, gx1)).clamp_min(0)
    ih = (torch.minimum(py2, gy2) - torch.maximum(py1, gy1)).clamp_min(0)
    inter = iw * ih
    union = pw * ph + gw * gh - inter + eps
    iou = inter / union
    cw = torch.maximum(px2, gx2) - torch.minimum(px1, gx1)
    ch = torch.maximum(py2, gy2) - torch.minimum(py1, gy1)
    c2 = cw * cw + ch * ch + eps
    rho2 = ((px1 + px2 - gx1 - gx2) ** 2 + (py1 + py2 - gy1 - gy2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(gw / gh) - torch.atan(pw / ph)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return iou - rho2 / c2 - alpha * v


@dataclass
class GeoLoss:
    """Scalars: total = smoothl1_weight * smoothl1 + ciou_weight * ciou; ``ciou`` is mean(1 − CIoU)."""

    total: torch.Tensor
    smoothl1: torch.Tensor
    ciou: torch.Tensor


def bbox_geo_loss(
    pred: torch.Tensor, target: torch.Tensor, smoothl1_weight: float = 1.0, ciou_weight: float = 1.0
) -> GeoLoss:
    """[G, 4] predicted and [G, 4] target fractions -> GeoLoss of means over the G boxes.

    Both boxes are canonicalised first. G = 0 gives zeros that keep ``pred``'s graph.
    """
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"pred and target must both be [G, 4], got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[0] == 0:
        zero = pred.sum().float() * 0.0
        return GeoLoss(total=zero, smoothl1=zero.detach().clone(), ciou=zero.detach().clone())
    p = canonicalize_boxes(pred.float())
    t = canonicalize_boxes(target.float())
    sl1 = smooth_l1_per_box(p, t).mean()
    one_minus_ciou = (1 - ciou(p, t)).mean()
    total = smoothl1_weight * sl1 + ciou_weight * one_minus_ciou
    return GeoLoss(total=total, smoothl1=sl1, ciou=one_minus_ciou)
