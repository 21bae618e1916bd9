"""eval.scores: token_prob / constant object confidences, and their effect on AP."""

from __future__ import annotations

import math

import pytest
import torch

from eval.detection import evaluate_detection
from eval.scores import score_objects


def _obj(coord_pos, desc_span=None):
    return {"coord_pos": coord_pos, "desc_token_span": desc_span}


def test_token_prob_is_mean_coord_probability():
    probs = [0.9, 0.5, 0.25, 1.0, 0.5, 0.8, 0.6, 0.4, 0.2]
    lp = [math.log(p) for p in probs]
    objs = [_obj((1, 2, 3, 4)), _obj((5, 6, 7, 8))]
    # (.5 + .25 + 1 + .5) / 4 = .5625 ; (.8 + .6 + .4 + .2) / 4 = .5
    assert score_objects(objs, lp) == pytest.approx([0.5625, 0.5])
    # tensors work the same
    assert score_objects(objs, torch.tensor(lp)) == pytest.approx([0.5625, 0.5])


def test_include_desc_multiplies_by_mean_desc_probability():
    probs = [0.9, 0.5, 0.25, 1.0, 0.5, 0.8, 0.6]
    lp = [math.log(p) for p in probs]
    obj = _obj((3, 4, 5, 6), desc_span=(0, 2))
    coord = (1.0 + 0.5 + 0.8 + 0.6) / 4
    desc = (0.9 + 0.5) / 2
    assert score_objects([obj], lp, include_desc=True) == pytest.approx([coord * desc])
    assert score_objects([obj], lp, include_desc=False) == pytest.approx([coord])
    # an empty desc span keeps the coord score
    assert score_objects([_obj((3, 4, 5, 6), (2, 2))], lp, include_desc=True) == pytest.approx([coord])


def test_constant_mode_and_errors():
    assert score_objects([_obj((0, 1, 2, 3))] * 3, None, mode="constant") == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="score_mode must be one of"):
        score_objects([], [], mode="median")
    with pytest.raises(IndexError, match="outside the generated token_logprobs"):
        score_objects([_obj((0, 1, 2, 9))], [0.0] * 4)


def test_constant_vs_token_prob_change_ap_when_confidence_orders_hits_first():
    # The model emits the miss first (low coord confidence) and the hit second (high).
    # Two GT (A, B): hit == A, miss overlaps nothing.
    # token_prob ranks hit first: TP, FP -> AP = 51/101 (precision 1 up to recall .5).
    # constant keeps output order: FP, TP -> precision .5 at recall .5 -> AP = .5 * 51/101.
    gt = [{"desc": "cat", "bbox_2d": [10, 10, 110, 110]}, {"desc": "cat", "bbox_2d": [200, 100, 300, 200]}]
    boxes = [[300, 250, 390, 290], [10, 10, 110, 110]]
    objs = [_obj((0, 1, 2, 3)), _obj((4, 5, 6, 7))]
    lp = [math.log(0.3)] * 4 + [math.log(0.95)] * 4

    def ap(mode):
        scores = score_objects(objs, lp, mode=mode)
        pred = [{"desc": "cat", "bbox_2d": b, "score": s} for b, s in zip(boxes, scores)]
        return evaluate_detection([{"image_id": 0, "width": 400, "height": 300, "gt": gt, "pred": pred}]).metrics["AP"]

    assert ap("token_prob") == pytest.approx(51 / 101)
    assert ap("constant") == pytest.approx(0.5 * 51 / 101)
