"""Hungarian matching with IoU gate, hand-computed IoUs, and deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest

from configs.types import MatchingConfig
from rollout.matching import hungarian_match, iou_matrix


def test_iou_matrix_hand_values():
    pred = [[0, 0, 10, 10], [6, 0, 16, 10], [20, 20, 20, 30]]
    gt = [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 20, 30]]
    iou = iou_matrix(pred, gt)
    # [0,0,10,10] vs [5,0,15,10]: inter 5*10 = 50, union 100+100-50 = 150
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(50 / 150)
    # [6,0,16,10] vs [0,0,10,10]: inter 4*10 = 40, union 160 -> 0.25
    assert iou[1, 0] == pytest.approx(0.25)
    # [6,0,16,10] vs [5,0,15,10]: inter 9*10 = 90, union 110
    assert iou[1, 1] == pytest.approx(90 / 110)
    # degenerate box: 0 with others, 1 with an exact copy of itself
    assert iou[2, 0] == 0.0 and iou[2, 2] == 1.0


def test_perfect_match_permuted():
    gt = [[0, 0, 100, 100], [200, 200, 300, 300], [500, 0, 600, 50]]
    pred = [gt[2], gt[0], gt[1]]
    m = hungarian_match(pred, gt)
    assert m.pairs == [(0, 2), (1, 0), (2, 1)]
    assert m.fp == [] and m.fn == [] and m.ious == [1.0, 1.0, 1.0]
    assert (m.num_pred, m.num_gt) == (3, 3)


def test_all_fp_and_all_fn():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30]]
    m = hungarian_match(boxes, [])
    assert m.pairs == [] and m.fp == [0, 1] and m.fn == []
    m = hungarian_match([], boxes)
    assert m.pairs == [] and m.fp == [] and m.fn == [0, 1]
    # disjoint boxes: nothing passes the gate
    m = hungarian_match([[0, 0, 10, 10]], [[500, 500, 600, 600]])
    assert m.pairs == [] and m.fp == [0] and m.fn == [0]


def test_pair_below_gate_is_infeasible():
    pred, gt = [[6, 0, 16, 10]], [[0, 0, 10, 10]]  # IoU 0.25
    m = hungarian_match(pred, gt, MatchingConfig(iou_gate=0.3))
    assert m.pairs == [] and m.fp == [0] and m.fn == [0]
    m = hungarian_match(pred, gt, MatchingConfig(iou_gate=0.25))  # the gate is inclusive
    assert m.pairs == [(0, 0)] and m.ious == [pytest.approx(0.25)]


def test_global_optimum_not_greedy():
    # Boxes of equal height, so IoU = x-overlap / x-union.
    gt = [[0, 0, 100, 100], [50, 0, 150, 100]]
    pred = [[0, 0, 100, 100], [0, 0, 90, 100]]
    iou = iou_matrix(pred, gt)
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(50 / 150)
    assert iou[1, 0] == pytest.approx(0.9) and iou[1, 1] == pytest.approx(40 / 150)  # below the gate
    # Greedy (best IoU first) would take pred0-gt0 and leave pred1/gt1 unmatched: cost 0 + 1 + 1 = 2.
    # The optimum crosses over: (1 - 1/3) + (1 - 0.9) = 0.767.
    m = hungarian_match(pred, gt, MatchingConfig(iou_gate=0.3))
    assert m.pairs == [(0, 1), (1, 0)] and m.fp == [] and m.fn == []
    assert m.ious == [pytest.approx(1 / 3), pytest.approx(0.9)]


def test_ties_resolved_the_same_way_every_run():
    box = [10, 10, 50, 50]
    # two identical predictions for one GT: the lower prediction index wins
    for _ in range(5):
        m = hungarian_match([box, box], [box])
        assert m.pairs == [(0, 0)] and m.fp == [1] and m.fn == []
    # one prediction for two identical GTs: the lower GT index wins
    for _ in range(5):
        m = hungarian_match([box], [box, box])
        assert m.pairs == [(0, 0)] and m.fn == [1]
    # IoUs that differ only by float noise (< 1e-6) are ties too
    gt = [[0, 0, 1000, 1000]]
    a = np.array([[0, 0, 999, 1000]], dtype=np.float64)
    b = a + np.array([[0, 0, 1e-9, 0]])
    m = hungarian_match(np.concatenate([b, a]), gt)
    assert m.pairs == [(0, 0)]
    # identical 3x3 blocks: same answer on every call
    first = hungarian_match([box] * 3, [box] * 3)
    for _ in range(5):
        assert hungarian_match([box] * 3, [box] * 3) == first
    assert sorted(i for i, _ in first.pairs) == [0, 1, 2] and sorted(j for _, j in first.pairs) == [0, 1, 2]


def test_ties_go_to_the_lower_index_even_when_the_better_by_noise_box_comes_second():
    gt = [[0, 0, 1000, 1000]]
    a = np.array([[0, 0, 999, 1000]], dtype=np.float64)  # IoU 0.999
    b = a + np.array([[0, 0, 4e-4, 0]])  # IoU 0.9990004: equal to 6 decimals, a tie
    # the better-by-noise prediction second: the IoU rounding makes it a tie, the index tie-break
    # then picks prediction 0
    m = hungarian_match(np.concatenate([a, b]), gt)
    assert m.pairs == [(0, 0)] and m.fp == [1]
    # the same on the GT side: one prediction, the better-by-noise GT second -> GT 0
    m = hungarian_match(a, np.concatenate([a, b]))
    assert m.pairs == [(0, 0)] and m.fn == [1]
    # three identical predictions for two identical GTs: predictions 0 and 1 are matched
    box = [10, 10, 50, 50]
    m = hungarian_match([box] * 3, [box] * 2)
    assert sorted(i for i, _ in m.pairs) == [0, 1] and m.fp == [2]


def test_a_real_iou_difference_beats_the_index_tie_break():
    # the better box second, better by 1e-6 of IoU (one cost unit): it wins
    gt = [[0, 0, 1000, 1000]]
    worse, better = [0, 0, 990, 1000], [0, 0, 990.001, 1000]  # IoU 0.99 and 0.990001
    m = hungarian_match([worse, better], gt)
    assert m.pairs == [(1, 0)] and m.fp == [0]
    assert m.ious == [pytest.approx(0.990001)]
    # with many boxes too (tie-breaks up to 11, more than one cost unit): 4 worse copies, then the
    # better one, for 2 GTs
    far = [2000, 2000, 3000, 3000]
    m = hungarian_match([worse] * 4 + [better, far], [far, [0, 0, 1000, 1000]])
    assert m.pairs == [(4, 1), (5, 0)] and m.fp == [0, 1, 2, 3]

def test_only_fp_cost_plus_fn_cost_matters():
    # IoU 0.6: pair cost 0.4. A feasible pair is matched iff 1 - IoU < fp_cost + fn_cost, however
    # the sum is split between the two knobs.
    pred, gt = [[0, 0, 60, 100]], [[0, 0, 100, 100]]
    for fp_cost, fn_cost in [(0.25, 0.25), (0.45, 0.05), (0.05, 0.45), (1.0, 1.0)]:
        assert hungarian_match(pred, gt, MatchingConfig(fp_cost=fp_cost, fn_cost=fn_cost)).pairs == [(0, 0)]
    for fp_cost, fn_cost in [(0.2, 0.1), (0.1, 0.2), (0.01, 0.3)]:
        m = hungarian_match(pred, gt, MatchingConfig(fp_cost=fp_cost, fn_cost=fn_cost))
        assert m.pairs == [] and m.fp == [0] and m.fn == [0]

def test_bad_arguments():
    with pytest.raises(ValueError, match="iou_gate"):
        hungarian_match([[0, 0, 1, 1]], [[0, 0, 1, 1]], MatchingConfig(iou_gate=1.5))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        hungarian_match([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="fp_cost"):
        hungarian_match([[0, 0, 1, 1]], [[0, 0, 1, 1]], MatchingConfig(fp_cost=0))
