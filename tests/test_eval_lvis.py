"""LVIS federated evaluation (eval.lvis_eval through evaluate_detection) vs the lvis package called directly.

Three 100x100 images, categories bird / cat / dog, each with GT in one image:

1: GT cat [0,0,10,10]; neg: dog. Preds cat on the GT (0.9, TP), dog (0.8: dog is negative here -> FP),
   bird (0.7: neither GT nor negative here -> ignored).
2: GT dog [0,0,10,10]; not exhaustive: dog. Preds dog elsewhere (0.95: an FP of a not-exhaustive
   category -> ignored), dog on the GT (0.6, TP).
3: GT bird [0,0,20,20]; neg: cat. Preds bird [0,0,20,10] (0.5, IoU exactly 0.5), cat (0.95, negative -> FP).

By hand: cat = FP 0.95 then TP 0.9 -> precision 1/2 at every recall -> AP 0.5 at every IoU; dog = FP 0.8
then TP 0.6 -> 0.5 (1/3 if the not-exhaustive FP counted); bird = TP at IoU .50 only -> AP50 1, AP 1/10
(AP50 1/2 if the ignored 0.7 bird counted). AP = (0.5 + 0.5 + 0.1) / 3, AP50 = (0.5 + 0.5 + 1) / 3.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from eval.detection import evaluate_detection
from eval.lvis_eval import _numpy_float_alias


def _o(desc, box, score=None):
    return {"desc": desc, "bbox_2d": box, **({} if score is None else {"score": score})}


RECORDS = [
    {"image_id": 1, "width": 100, "height": 100, "neg_descs": ["dog"], "not_exhaustive_descs": [],
     "gt": [_o("cat", [0, 0, 10, 10])],
     "pred": [_o("cat", [0, 0, 10, 10], 0.9), _o("dog", [20, 20, 30, 30], 0.8), _o("bird", [40, 40, 50, 50], 0.7)]},
    {"image_id": 2, "width": 100, "height": 100, "neg_descs": [], "not_exhaustive_descs": ["dog"],
     "gt": [_o("dog", [0, 0, 10, 10])],
     "pred": [_o("dog", [50, 50, 60, 60], 0.95), _o("dog", [0, 0, 10, 10], 0.6)]},
    {"image_id": 3, "width": 100, "height": 100, "neg_descs": ["cat"], "not_exhaustive_descs": [],
     "gt": [_o("bird", [0, 0, 20, 20])],
     "pred": [_o("bird", [0, 0, 20, 10], 0.5), _o("cat", [30, 30, 40, 40], 0.95)]},
]  # fmt: skip

# The same set written for the lvis package by hand (its own category ids).
IDS = {"cat": 17, "dog": 18, "bird": 3}


def _direct(tmp_path) -> dict:
    from lvis import LVIS, LVISEval, LVISResults

    images = [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [18], "not_exhaustive_category_ids": []},
              {"id": 2, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": [18]},
              {"id": 3, "width": 100, "height": 100, "neg_category_ids": [17], "not_exhaustive_category_ids": []}]
    anns = [{"id": 1, "image_id": 1, "category_id": 17, "bbox": [0, 0, 10, 10], "area": 100},
            {"id": 2, "image_id": 2, "category_id": 18, "bbox": [0, 0, 10, 10], "area": 100},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 400}]
    cats = [{"id": i, "name": n, "frequency": "r"} for n, i in IDS.items()]
    results = [{"image_id": r["image_id"], "category_id": IDS[p["desc"]], "score": p["score"],
                "bbox": [p["bbox_2d"][0], p["bbox_2d"][1], p["bbox_2d"][2] - p["bbox_2d"][0], p["bbox_2d"][3] - p["bbox_2d"][1]]}
               for r in RECORDS for p in r["pred"]]
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
        gt = LVIS(str(path))
        ev = LVISEval(gt, LVISResults(gt, results, max_dets=300), iou_type="bbox")
        ev.run()
    return ev.get_results()


def test_federated_ap_matches_the_lvis_package_and_the_hand_values(tmp_path):
    rep = evaluate_detection(RECORDS)  # the records carry the LVIS lists: federated evaluation
    direct = _direct(tmp_path)
    assert rep.backend == "lvis"
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert rep.metrics[key] == pytest.approx(float(direct[key])), key
    assert rep.metrics["AP"] == pytest.approx((0.5 + 0.5 + 0.1) / 3)
    assert rep.metrics["AP50"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert rep.per_category == pytest.approx({"bird": 0.1, "cat": 0.5, "dog": 0.5})


def test_without_the_lvis_lists_coco_counts_every_prediction():
    plain = [{k: v for k, v in r.items() if k not in ("neg_descs", "not_exhaustive_descs")} for r in RECORDS]
    rep = evaluate_detection(plain)
    assert rep.backend == "pycocotools"
    # COCO: dog sees 0.95 FP, 0.8 FP, 0.6 TP -> 1/3; bird sees the 0.7 FP first -> AP50 1/2, AP 1/20.
    assert rep.per_category == pytest.approx({"bird": 0.05, "cat": 0.5, "dog": 1 / 3})
    assert evaluate_detection(plain, metrics="lvis").per_category == pytest.approx(
        {"bird": 0.1, "cat": 1.0, "dog": 0.5})  # lvis, no lists: an FP where the class has no GT is ignored
    # (cat's 0.95 in image 3, dog's 0.8 in image 1), dog's 0.95 FP in image 2 (exhaustive now) counts


def test_lvis_lists_round_trip_through_predictions_jsonl(tmp_path):
    from eval.detection import read_predictions_jsonl, write_predictions_jsonl

    path = write_predictions_jsonl(tmp_path / "p.jsonl", RECORDS)
    back = read_predictions_jsonl(path)
    assert [(r["neg_descs"], r["not_exhaustive_descs"]) for r in back] == [(["dog"], []), ([], ["dog"]), (["cat"], [])]
    assert evaluate_detection(back).metrics == evaluate_detection(RECORDS).metrics
