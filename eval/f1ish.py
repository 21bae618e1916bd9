"""F1-ish set matching (docs/EVAL.md "F1-ish"): location first, then the description.

Per image and IoU threshold ``t``:

1. Which predictions are evaluated: scope ``full`` takes every valid prediction; scope
   ``annotated`` only those whose desc maps (``eval.semantic``) to a category that has GT in this
   image (the others are ``pred_ignored``: an open-vocabulary model may name objects nobody
   annotated).
2. Greedy 1:1 location matching, class-agnostic: the (prediction, GT) pairs with IoU >= ``t``
   in descending IoU (ties: lower prediction index, then lower GT index) each take both ends
   while both are free.
3. A matched pair is a true positive when the prediction's mapped category is the GT's; a pair
   whose descs disagree counts as one FP and one FN. ``fp = evaluated preds - tp``,
   ``fn = gt - tp``.

Micro: precision / recall / F1 of the summed counts (``rollout.metrics.precision_recall_f1``).
Macro: the per-image mean; an image with no GT and no evaluated prediction scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rollout.metrics import precision_recall_f1

SCOPES = ("annotated", "full")
STATS = ("precision", "recall", "f1")


@dataclass(frozen=True)
class ImageF1ish:
    """One image at one IoU threshold and scope. ``pairs``: (pred index, gt index, IoU, desc agrees)."""

    tp: int
    fp: int
    fn: int
    pred_ignored: int
    pairs: tuple[tuple[int, int, float, bool], ...]

    def prf(self) -> tuple[float, float, float]:
        if self.tp + self.fp == 0 and self.tp + self.fn == 0:
            return 1.0, 1.0, 1.0  # nothing to find and nothing claimed: a perfect image
        return precision_recall_f1(self.tp, self.tp + self.fp, self.tp + self.fn)


def greedy_pairs(ious: Sequence[Sequence[float]], iou_thr: float) -> list[tuple[int, int, float]]:
    """1:1 pairs ``(row, col, iou)`` with iou >= ``iou_thr``, taken in descending IoU (ties by row, col)."""
    cand = [(-v, i, j) for i, row in enumerate(ious) for j, v in enumerate(row) if v >= iou_thr]
    cand.sort()
    used_i, used_j, out = set(), set(), []
    for neg, i, j in cand:
        if i in used_i or j in used_j:
            continue
        used_i.add(i)
        used_j.add(j)
        out.append((i, j, -neg))
    return out


def image_f1ish(
    gt_cats: Sequence[str], pred_cats: Sequence[str | None], ious: Sequence[Sequence[float]], iou_thr: float, scope: str
) -> ImageF1ish:
    """F1-ish of one image. ``ious[p][g]``: IoU of prediction ``p`` and GT ``g``; ``pred_cats[p]`` None = unmapped."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    present = set(gt_cats)
    keep = [p for p, c in enumerate(pred_cats) if scope == "full" or c in present]
    pairs = greedy_pairs([ious[p] for p in keep], iou_thr)
    out = tuple((keep[i], j, iou, pred_cats[keep[i]] == gt_cats[j]) for i, j, iou in pairs)
    tp = sum(1 for *_, ok in out if ok)
    return ImageF1ish(tp=tp, fp=len(keep) - tp, fn=len(gt_cats) - tp, pred_ignored=len(pred_cats) - len(keep), pairs=out)


def summarize(per_image: Sequence[ImageF1ish], prefix: str) -> dict[str, float]:
    """Micro and macro precision/recall/F1 plus the counts, keyed ``<prefix>_<micro|macro>_<stat>``."""
    tp = sum(r.tp for r in per_image)
    fp = sum(r.fp for r in per_image)
    fn = sum(r.fn for r in per_image)
    micro = precision_recall_f1(tp, tp + fp, tp + fn)
    per = [r.prf() for r in per_image]
    macro = [sum(v[k] for v in per) / len(per) if per else 0.0 for k in range(3)]
    out = {f"{prefix}_micro_{s}": float(v) for s, v in zip(STATS, micro)}
    out.update({f"{prefix}_macro_{s}": float(v) for s, v in zip(STATS, macro)})
    matched = sum(len(r.pairs) for r in per_image)
    out.update({f"{prefix}_tp": tp, f"{prefix}_fp": fp, f"{prefix}_fn": fn,
                f"{prefix}_pred_ignored": sum(r.pred_ignored for r in per_image),
                f"{prefix}_loc_matched": matched,
                f"{prefix}_desc_accuracy": tp / matched if matched else 0.0})
    return out


def key_prefix(iou_thr: float, scope: str) -> str:
    return f"f1ish@{iou_thr:g}_{scope}"


def oracle_image(gt_cats: Sequence[str], samples: Sequence[tuple[Sequence[str | None], Sequence[Sequence[float]]]],
                 iou_thr: float) -> tuple[int, ImageF1ish | None]:
    """Oracle-K of one image: the GT found (a TP, scope full) by at least one of the K rollouts, and the
    rollout with the best F1-ish (first on ties). ``samples``: per rollout (mapped categories, ious[p][g])."""
    found: set[int] = set()
    best, best_f1 = None, -1.0
    for cats, ious in samples:
        res = image_f1ish(gt_cats, cats, ious, iou_thr, "full")
        found.update(g for _, g, _, ok in res.pairs if ok)
        f1 = res.prf()[2]
        if f1 > best_f1:
            best, best_f1 = res, f1
    return len(found), best


def oracle_summarize(found: int, n_gt: int, best: Sequence[ImageF1ish], iou_thr: float) -> dict[str, float]:
    """``oracle_k@<t>_recall`` (GT found by any rollout / GT) and ``oracle_k@<t>_f1`` (micro F1 of each
    image's best rollout)."""
    tp, fp, fn = (sum(getattr(r, k) for r in best) for k in ("tp", "fp", "fn"))
    return {f"oracle_k@{iou_thr:g}_recall": found / n_gt if n_gt else 0.0,
            f"oracle_k@{iou_thr:g}_f1": precision_recall_f1(tp, tp + fp, tp + fn)[2]}
