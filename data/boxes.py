"""The one IoU of CoordExp: rollout matching (bins) and the eval F1 (pixels) both use it.

Boxes are ``[x1, y1, x2, y2]``, continuous (no +1): area ``(x2 - x1) * (y2 - y1)``. The
degenerate-box rule: a box with ``x2 <= x1`` or ``y2 <= y1`` has zero area, so its IoU with any
other box is 0; two identical boxes have IoU 1, degenerate or not (a zero-width GT box that the
model writes exactly is a hit, so a degenerate GT can still be matched). COCO AP uses pycocotools'
own IoU, where a zero-area box matches nothing (docs/EVAL.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def iou_matrix(boxes_a, boxes_b) -> np.ndarray:
    """``[A, 4]`` x ``[B, 4]`` -> ``[A, B]`` float64 IoU (the rule above)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    same = (a[:, None, :] == b[None, :, :]).all(-1)
    return np.where(same, 1.0, iou)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (the rule above)."""
    return float(iou_matrix([a], [b])[0, 0])


__all__ = ["box_iou", "iou_matrix"]
