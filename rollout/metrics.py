"""Rollout counters for one micro-step, named as docs/training/METRICS_CONTRACT.md requires.

Only counters (``*_total``, ``*_count``, ``*_num``, ``*_den``): the aggregator sums them over micro-steps
and ranks and derives the step's rates from the sums (``rollout/precision|recall|f1``,
``parse_valid_rate``, ``{gt,pred}_per_sample``: ``training.aggregator.ROLLOUT_DERIVED``), as in-loop eval
does over its images; a rate of one micro-step would only be overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence

from rollout.types import DROP_REASONS, MatchResult, ParsedRollout


def precision_recall_f1(matched: float, n_pred: float, n_gt: float) -> tuple[float, float, float]:
    """The one detection-counts formula: ``(matched / pred, matched / gt, 2·matched / (pred + gt))``.

    Each is 0 when its denominator is 0 (no predictions: precision 0, not NaN). Used by the
    rollout counters, the training aggregator's derived step values, in-loop and offline eval.
    """
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_gt if n_gt else 0.0
    f1 = 2.0 * matched / (n_pred + n_gt) if n_pred + n_gt else 0.0
    return float(precision), float(recall), float(f1)


def rollout_counters(
    parsed_list: Sequence[ParsedRollout], match_list: Sequence[MatchResult], gt_counts: Sequence[int]
) -> dict[str, float]:
    """Metrics of a batch of rollouts (one entry per sample in each sequence).

    Keys: ``rollout/{gt_objects,valid_pred_objects,fp,fn,matched}_total``, ``rollout/drop_<reason>_count`` for
    every reason in ``DROP_REASONS``, ``rollout/{container_missing,container_preamble,eos_missing}_count``, and
    the internal ``rollout/_parse_valid_num`` (samples whose container was found and closed with no object
    dropped) / ``rollout/_samples_den``.
    """
    if not len(parsed_list) == len(match_list) == len(gt_counts):
        raise ValueError(
            f"rollout_counters needs one match and one GT count per rollout, got {len(parsed_list)} rollouts, "
            f"{len(match_list)} matches, {len(gt_counts)} GT counts"
        )
    n = len(parsed_list)
    matched = sum(len(m.pairs) for m in match_list)
    fp = sum(len(m.fp) for m in match_list)
    fn = sum(len(m.fn) for m in match_list)
    valid = sum(len(p.valid_objects) for p in parsed_list)
    gt = sum(int(g) for g in gt_counts)
    for p, m, g in zip(parsed_list, match_list, gt_counts):
        if len(m.pairs) + len(m.fp) != len(p.valid_objects) or len(m.pairs) + len(m.fn) != int(g):
            raise ValueError("a MatchResult does not belong to its rollout / GT count (pairs + fp != valid preds)")
    drops = dict.fromkeys(DROP_REASONS, 0)
    for p in parsed_list:
        for reason, c in p.drop_reasons.items():
            drops[reason] = drops.get(reason, 0) + c
    parse_valid = sum(1 for p in parsed_list if p.parse_valid)
    out: dict[str, float] = {
        "rollout/gt_objects_total": float(gt),
        "rollout/valid_pred_objects_total": float(valid),
        "rollout/fp_total": float(fp),
        "rollout/fn_total": float(fn),
        "rollout/matched_total": float(matched),
        "rollout/container_missing_count": float(sum(1 for p in parsed_list if not p.container_found)),
        "rollout/container_preamble_count": float(sum(1 for p in parsed_list if p.has_preamble)),
        "rollout/eos_missing_count": float(sum(1 for p in parsed_list if not p.eos_found)),
        "rollout/_parse_valid_num": float(parse_valid),
        "rollout/_samples_den": float(n),
    }
    for reason, c in drops.items():
        out[f"rollout/drop_{reason}_count"] = float(c)
    return out


__all__ = ["precision_recall_f1", "rollout_counters"]
