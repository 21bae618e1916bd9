"""F1-ish (eval.f1ish through eval.detection.evaluate_detection): every number worked out by hand.

Four 100x100 images, exact desc matching:

A: GT cat [0,0,10,10], dog [20,0,30,10]; preds "cat" on the cat (IoU 1), "cat" on the dog (IoU 1:
   a location match whose descs disagree), "truck" far away (unmapped: no GT desc in the image).
B: GT cat [0,0,10,10]; pred "cat" [0,0,10,4] (IoU 40/100 = 0.4: a match at 0.3, not at 0.5).
C: no GT, no pred (an empty image scores 1 for macro).
D: no GT; pred "dog" [0,0,5,5] (dog is a category of the set, but not of this image).

Scope full at IoU 0.5: A tp 1 fp 2 fn 1; B 0/1/1; C 0/0/0; D 0/1/0 -> tp 1, fp 4, fn 2:
  micro P 1/5, R 1/3, F1 2/(5+3) = 0.25; per image (P, R, F1): A (1/3, 1/2, 2/5), B 0, C 1, D 0
  -> macro P (1/3+1)/4 = 1/3, R (1/2+1)/4 = 0.375, F1 (0.4+1)/4 = 0.35.
Scope annotated at 0.5: truck (A) and dog (D) are ignored -> A 1/1/1, B 0/1/1, C, D empty:
  tp 1, fp 2, fn 2, ignored 2 -> micro P = R = F1 = 1/3; macro (A 1/2, B 0, C 1, D 1) = 0.625 each.
At 0.3 B becomes 1/0/0: full tp 2 fp 3 fn 1 -> P 0.4, R 2/3, F1 4/8 = 0.5; macro F1 (0.4+1+1+0)/4 = 0.6;
  annotated tp 2 fp 1 fn 1 -> P = R = F1 = 2/3; macro F1 (0.5+1+1+1)/4 = 0.875.
"""

from __future__ import annotations

import pytest

from eval.detection import evaluate_detection
from eval.f1ish import greedy_pairs, image_f1ish


def _img(i, gt, pred):
    return {"image_id": i, "width": 100, "height": 100,
            "gt": [{"desc": d, "bbox_2d": b} for d, b in gt],
            "pred": [{"desc": d, "bbox_2d": b, "score": 0.5} for d, b in pred]}


CAT, DOG = [0, 0, 10, 10], [20, 0, 30, 10]
RECORDS = [
    _img("A", [("cat", CAT), ("dog", DOG)], [("cat", CAT), ("cat", DOG), ("truck", [50, 50, 60, 60])]),
    _img("B", [("cat", CAT)], [("cat", [0, 0, 10, 4])]),
    _img("C", [], []),
    _img("D", [], [("dog", [0, 0, 5, 5])]),
]


@pytest.fixture(scope="module")
def report():
    return evaluate_detection(RECORDS, metrics="both", f1ish_iou=(0.3, 0.5))


def test_full_scope_at_05(report):
    f = report.f1ish
    assert (f["f1ish@0.5_full_tp"], f["f1ish@0.5_full_fp"], f["f1ish@0.5_full_fn"]) == (1, 4, 2)
    assert f["f1ish@0.5_full_micro_precision"] == pytest.approx(1 / 5)
    assert f["f1ish@0.5_full_micro_recall"] == pytest.approx(1 / 3)
    assert f["f1ish@0.5_full_micro_f1"] == pytest.approx(0.25)
    assert f["f1ish@0.5_full_macro_precision"] == pytest.approx(1 / 3)
    assert f["f1ish@0.5_full_macro_recall"] == pytest.approx(0.375)
    assert f["f1ish@0.5_full_macro_f1"] == pytest.approx(0.35)
    assert f["f1ish@0.5_full_loc_matched"] == 2 and f["f1ish@0.5_full_desc_accuracy"] == pytest.approx(0.5)
    assert f["f1ish@0.5_full_pred_ignored"] == 0


def test_annotated_scope_at_05(report):
    f = report.f1ish
    assert (f["f1ish@0.5_annotated_tp"], f["f1ish@0.5_annotated_fp"], f["f1ish@0.5_annotated_fn"]) == (1, 2, 2)
    assert f["f1ish@0.5_annotated_pred_ignored"] == 2
    for stat in ("precision", "recall", "f1"):
        assert f[f"f1ish@0.5_annotated_micro_{stat}"] == pytest.approx(1 / 3)
        assert f[f"f1ish@0.5_annotated_macro_{stat}"] == pytest.approx(0.625)


def test_both_scopes_at_03(report):
    f = report.f1ish
    assert (f["f1ish@0.3_full_tp"], f["f1ish@0.3_full_fp"], f["f1ish@0.3_full_fn"]) == (2, 3, 1)
    assert f["f1ish@0.3_full_micro_precision"] == pytest.approx(0.4)
    assert f["f1ish@0.3_full_micro_recall"] == pytest.approx(2 / 3)
    assert f["f1ish@0.3_full_micro_f1"] == pytest.approx(0.5)
    assert f["f1ish@0.3_full_macro_f1"] == pytest.approx(0.6)
    assert f["f1ish@0.3_annotated_micro_f1"] == pytest.approx(2 / 3)
    assert f["f1ish@0.3_annotated_macro_f1"] == pytest.approx(0.875)


def test_metrics_f1ish_skips_coco_and_gives_the_same_f1ish(report):
    only = evaluate_detection(RECORDS, metrics="f1ish", f1ish_iou=(0.3, 0.5))
    assert only.f1ish == report.f1ish
    assert "AP" not in only.metrics and "AP" in report.metrics


def test_greedy_pairs_take_the_highest_iou_first():
    # pred 0 overlaps GT 1 at 0.9 and GT 0 at 0.6; pred 1 overlaps only GT 1 (0.8): greedy, not optimal.
    assert greedy_pairs([[0.6, 0.9], [0.0, 0.8]], 0.5) == [(0, 1, 0.9)]
    assert greedy_pairs([[0.5, 0.5]], 0.5) == [(0, 0, 0.5)]  # ties: the lower GT index


def test_a_desc_mismatch_is_one_fp_and_one_fn_in_both_scopes():
    for scope in ("full", "annotated"):
        res = image_f1ish(["cat", "dog"], ["dog"], [[1.0, 0.0]], 0.5, scope)
        assert (res.tp, res.fp, res.fn) == (0, 1, 2) and res.pairs == ((0, 0, 1.0, False),)
    with pytest.raises(ValueError, match="scope"):
        image_f1ish([], [], [], 0.5, "partial")


def test_oracle_k_recall_and_f1_by_hand(tmp_path):
    """X: GT cat, dog; greedy finds the cat; rollout 0 finds the dog only, rollout 1 the cat plus a far bird (FP).
    Y: GT cat; greedy and rollout 0 say nothing, rollout 1 boxes the cat at IoU 0.4.
    IoU 0.5: found X {dog, cat}, Y {} -> recall 2/3 (greedy 1/3). Best rollout per image: X rollout 0
    (F1 2/3 vs 1/2), Y rollout 0 (both 0, first wins): tp 1, fp 0, fn 2 -> F1 2/(1+3) = 0.5.
    IoU 0.3: Y rollout 1 is a TP -> recall 3/3; best X 0, Y 1: tp 2, fp 0, fn 1 -> F1 4/5 = 0.8."""
    from eval.detection import read_predictions_jsonl, write_predictions_jsonl

    def objs(*pairs):
        return [{"desc": d, "bbox_2d": b} for d, b in pairs]

    recs = [
        {**_img("X", [("cat", CAT), ("dog", DOG)], [("cat", CAT)]),
         "samples": [{"pred": objs(("dog", DOG))}, {"pred": objs(("cat", CAT), ("bird", [60, 60, 70, 70]))}]},
        {**_img("Y", [("cat", CAT)], []), "samples": [{"pred": []}, {"pred": objs(("cat", [0, 0, 10, 4]))}]},
    ]
    rep = evaluate_detection(recs)
    assert rep.oracle_k == pytest.approx({"oracle_k_samples": 2, "oracle_k@0.5_recall": 2 / 3, "oracle_k@0.5_f1": 0.5,
                                          "oracle_k@0.3_recall": 1.0, "oracle_k@0.3_f1": 0.8})
    assert rep.f1ish["f1ish@0.5_full_micro_recall"] == pytest.approx(1 / 3)  # the greedy decode, next to it
    back = read_predictions_jsonl(write_predictions_jsonl(tmp_path / "p.jsonl", recs))
    assert evaluate_detection(back).oracle_k == rep.oracle_k
    assert evaluate_detection(RECORDS).oracle_k == {}  # no samples, no Oracle-K
    with pytest.raises(ValueError, match="same number of samples"):
        evaluate_detection([recs[0], {**recs[1], "samples": recs[1]["samples"][:1]}])
