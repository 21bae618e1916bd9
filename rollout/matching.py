"""Hungarian matching of valid rollout predictions to GT boxes, with an IoU gate (docs/training/STAGE2_RUNBOOK.md).

Boxes are bins ``[x1, y1, x2, y2]`` (0..999); IoU is ``data.boxes.iou_matrix`` in bin space (the
one IoU: continuous, no +1; a degenerate box matches only an exact copy of itself). Cost of a pair is ``1 - IoU``; a pair with
``IoU < iou_gate`` is infeasible. Leaving a prediction unmatched costs ``fp_cost``, leaving a GT
unmatched ``fn_cost``: the problem is solved exactly on the augmented ``(P+G) x (G+P)`` matrix

    [ C (P x G)            | fp_cost on diag (P x P) ]
    [ fn_cost on diag (GxG) | 0 (G x P)               ]

with ``scipy.optimize.linear_sum_assignment``.

Ties: pair costs are quantised to integer units of 1e-6 (IoUs equal to 6 decimals are ties, so
float noise cannot decide a match), then every entry is scaled by ``K`` and pair ``(i, j)`` gets
the tie-break ``i * G + j`` added (``K`` exceeds the largest possible sum of tie-breaks, so
the tie-break never overrides a real cost difference). Among equally good assignments the
one with the smallest sum of ``i * G + j`` wins: lower-indexed predictions/GTs are preferred
when only some of them can be matched. The matrix is integer-valued in float64, exact while
``K * cost`` stays below 2**53 (``P, G`` up to a few hundred); beyond that the tie-break is
dropped and ties are left to the solver, which is still deterministic for a given input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from configs.types import MatchingConfig
from data.boxes import iou_matrix
from data.descs import normalize_desc
from rollout.types import MatchResult

_QUANT = 1_000_000  # cost units per 1.0
_EXACT = float(2**53)


def _check_boxes(name: str, boxes) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must be [N, 4] bins (x1, y1, x2, y2), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


_DEFAULT = MatchingConfig()  # the declared defaults


def hungarian_match(
    pred_bins: Sequence[Sequence[int]],
    gt_bins: Sequence[Sequence[int]],
    matching: MatchingConfig = _DEFAULT,
    *,
    desc_sim: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> MatchResult:
    """Match ``pred_bins [P, 4]`` to ``gt_bins [G, 4]`` (bins); see the module docstring.

    matching: ``rollout_matching.matching`` (checked where it is built): ``iou_gate`` (pairs with IoU below it
    never match), ``fp_cost`` / ``fn_cost`` (leaving a prediction / a GT unmatched; only their sum matters),
    ``desc_gate`` (with a gate, a pair also needs ``desc_sim >= desc_gate``: ``desc_sim`` are the ``[P, G]``
    desc similarities of :func:`desc_similarity_matrix`; pairs above the IoU gate refused by it are counted
    in ``MatchResult.desc_gate_rejected``).
    Returns pairs sorted by prediction index, plus unmatched prediction (fp) and GT (fn) indices.
    """
    iou_gate, fp_cost, fn_cost, desc_gate = matching.iou_gate, matching.fp_cost, matching.fn_cost, matching.desc_gate
    p_arr = _check_boxes("pred_bins", pred_bins)
    g_arr = _check_boxes("gt_bins", gt_bins)
    P, G = p_arr.shape[0], g_arr.shape[0]
    if P == 0 or G == 0:
        return MatchResult(pairs=[], fp=list(range(P)), fn=list(range(G)), ious=[], num_pred=P, num_gt=G)

    iou = iou_matrix(p_arr, g_arr)
    feasible = iou >= iou_gate
    rejected = 0
    if desc_gate is not None:
        if desc_sim is None or np.shape(desc_sim) != (P, G):
            raise ValueError(f"desc_gate needs desc_sim of shape ({P}, {G}), got {None if desc_sim is None else np.shape(desc_sim)}")
        desc_ok = np.asarray(desc_sim, dtype=np.float64) >= desc_gate
        rejected = int((feasible & ~desc_ok).sum())
        feasible &= desc_ok
    pair_units = np.rint((1.0 - iou) * _QUANT)
    fp_units = float(np.rint(fp_cost * _QUANT))
    fn_units = float(np.rint(fn_cost * _QUANT))
    K = float(min(P, G) * P * G + 1)
    worst = (max(float(pair_units.max()), fp_units, fn_units) + 1.0) * (P + G)
    tie = (np.arange(P)[:, None] * G + np.arange(G)[None, :]).astype(np.float64)
    if worst * K + K >= _EXACT:
        K, tie = 1.0, np.zeros_like(tie)

    n = P + G
    big = np.full((n, n), np.inf)
    big[:P, :G] = np.where(feasible, pair_units * K + tie, np.inf)
    big[np.arange(P), G + np.arange(P)] = fp_units * K
    big[P + np.arange(G), np.arange(G)] = fn_units * K
    big[P:, G:] = 0.0
    rows, cols = linear_sum_assignment(big)

    pairs: list[tuple[int, int]] = []
    matched_p: set[int] = set()
    matched_g: set[int] = set()
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r < P and c < G:
            pairs.append((r, c))
            matched_p.add(r)
            matched_g.add(c)
    pairs.sort()
    return MatchResult(
        pairs=pairs,
        fp=[i for i in range(P) if i not in matched_p],
        fn=[j for j in range(G) if j not in matched_g],
        ious=[float(iou[i, j]) for i, j in pairs],
        num_pred=P,
        num_gt=G,
        desc_gate_rejected=rejected,
    )


def desc_similarity_matrix(pred_descs: Sequence[str | None], gt_descs: Sequence[str], encoder=None) -> np.ndarray:
    """``[P, G]`` desc similarity: 1 for equal normalised descs (``data.descs.normalize_desc``), else the
    encoder's cosine (``eval.semantic.DescEncoder``), or 0 without an encoder; a missing desc is 0."""

    P, G = len(pred_descs), len(gt_descs)
    out = np.zeros((P, G), dtype=np.float64)
    if P == 0 or G == 0:
        return out
    if encoder is not None:
        known = [i for i, d in enumerate(pred_descs) if d is not None]
        if known:
            out[known] = encoder.embed([pred_descs[i] for i in known]) @ encoder.embed(list(gt_descs)).T
    gt_norm = [normalize_desc(g) for g in gt_descs]
    for i, d in enumerate(pred_descs):
        if d is None:
            out[i] = 0.0
            continue
        n = normalize_desc(d)
        for j, g in enumerate(gt_norm):
            if n == g:
                out[i, j] = 1.0
    return out


__all__ = ["desc_similarity_matrix", "hungarian_match", "iou_matrix"]
