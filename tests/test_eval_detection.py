"""eval.detection: COCO metrics on hand-built cases whose values are worked out by hand.

COCO AP at one IoU threshold is the mean over 101 recall points r in {0, .01, ..., 1}
of the interpolated precision max{p(r') : r' >= r}; AP is the mean over the 10 IoU
thresholds .50:.05:.95.
"""

from __future__ import annotations

import math

import pytest

from data.boxes import box_iou
from data.records import bins_to_pixels
from eval.detection import (
    DetectionObject,
    DetectionRecord,
    evaluate_detection,
    normalize_desc,
)

BOX = [10.0, 10.0, 110.0, 110.0]  # 100 x 100 px: area 10000 > 96², a "large" object


def _shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


def _rec(i, gt, pred, **kw):
    return {"image_id": i, "width": 400, "height": 300, "gt": gt, "pred": pred, **kw}


def test_perfect_predictions_give_ap_one():
    recs = [
        _rec(0, [{"desc": "cat", "bbox_2d": BOX}, {"desc": "dog", "bbox_2d": [200, 50, 300, 250]}],
             [{"desc": "dog", "bbox_2d": [200, 50, 300, 250], "score": 0.5}, {"desc": "cat", "bbox_2d": BOX}]),
        _rec(1, [{"desc": "cat", "bbox_2d": [5, 5, 25, 25]}], [{"desc": "cat", "bbox_2d": [5, 5, 25, 25], "score": 0.7}]),
    ]  # fmt: skip
    rep = evaluate_detection(recs)
    assert rep.metrics["AP"] == pytest.approx(1.0)
    assert rep.metrics["AP50"] == pytest.approx(1.0)
    assert rep.metrics["AR100"] == pytest.approx(1.0)
    assert rep.metrics["APs"] == pytest.approx(1.0)  # the 20x20 cat is small
    # no medium GT: not evaluated, -1 like pycocotools (a 0.0 would be a false measurement)
    assert rep.metrics["APm"] == -1.0 and rep.metrics["ARm"] == -1.0 and rep.counters["gt_medium_count"] == 0
    assert rep.metrics["APl"] == pytest.approx(1.0) and rep.metrics["ARl"] == pytest.approx(1.0)
    assert rep.metrics["F1@0.5"] == 1.0
    assert rep.per_category == pytest.approx({"cat": 1.0, "dog": 1.0})
    assert rep.counters["gt_objects"] == 3 and rep.counters["pred_objects"] == 3
    assert rep.counters["pred_default_score_count"] == 1
    assert rep.counters["gt_small_count"] == 1 and rep.counters["gt_large_count"] == 2


def test_no_predictions_give_zero_without_exception():
    rep = evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": BOX}], []), _rec(1, [], [])])
    area = (BOX[2] - BOX[0]) * (BOX[3] - BOX[1])
    bucket = "s" if area <= 32**2 else "m" if area <= 96**2 else "l"
    for k, v in rep.metrics.items():
        in_range = k[-1] == bucket or k[-1] not in "sml"
        assert v == (0.0 if in_range else -1.0), k
    assert rep.per_category == {"cat": 0.0}
    assert rep.counters["images_without_pred_count"] == 2
    assert rep.counters["images_without_gt_count"] == 1
    assert rep.counters["f1_fn_count"] == 1
    # no records at all is also fine
    assert evaluate_detection([]).metrics["AP"] == 0.0


def test_half_of_the_boxes_shifted_below_iou_half():
    # 4 images, one 100x100 GT each. Images 0, 2: exact predictions (score .9).
    # Images 1, 3: shifted 50 px right -> IoU = 50*100 / (150*100) = 1/3 < .5 (score .8).
    # At every IoU threshold the ranked list is TP, TP, FP, FP over 4 GT:
    # precision 1 up to recall .5, nothing beyond. Interpolated precision is 1 for the
    # 51 recall points 0, .01, ..., .50 and 0 for the other 50 -> AP = 51/101 at every
    # threshold, so AP = AP50 = AP75 = 51/101. Max recall .5 -> AR100 = .5.
    recs = [
        _rec(i, [{"desc": "cat", "bbox_2d": BOX}],
             [{"desc": "cat", "bbox_2d": _shift(BOX, 50 if i % 2 else 0), "score": 0.8 if i % 2 else 0.9}])
        for i in range(4)
    ]  # fmt: skip
    rep = evaluate_detection(recs)
    assert box_iou(BOX, _shift(BOX, 50)) == pytest.approx(1 / 3)
    for k in ("AP", "AP50", "AP75", "APl"):
        assert rep.metrics[k] == pytest.approx(51 / 101), k
    assert rep.metrics["AR100"] == pytest.approx(0.5)
    # F1: TP 2, FP 2, FN 2 -> P = R = F1 = .5
    assert rep.metrics["F1@0.5"] == pytest.approx(0.5)
    assert (rep.counters["f1_tp_count"], rep.counters["f1_fp_count"], rep.counters["f1_fn_count"]) == (2, 2, 2)


def test_shift_with_iou_two_thirds_matches_four_of_ten_thresholds():
    # Shift 20 px: IoU = 80*100 / (120*100) = 2/3. It matches at .50, .55, .60, .65 and
    # fails at .70 ... .95: AP per threshold is 1 for 4 thresholds, 0 for 6 -> AP = .4,
    # AP50 = 1, AP75 = 0; recall likewise -> AR100 = .4.
    rep = evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": BOX}], [{"desc": "cat", "bbox_2d": _shift(BOX, 20)}])])
    assert box_iou(BOX, _shift(BOX, 20)) == pytest.approx(2 / 3)
    assert rep.metrics["AP"] == pytest.approx(0.4)
    assert rep.metrics["AP50"] == pytest.approx(1.0)
    assert rep.metrics["AP75"] == pytest.approx(0.0)
    assert rep.metrics["AR100"] == pytest.approx(0.4)


def test_wrong_desc_cannot_match_and_is_counted():
    recs = [_rec(0, [{"desc": "cat", "bbox_2d": BOX}], [{"desc": "zebra", "bbox_2d": BOX, "score": 0.9}])]
    rep = evaluate_detection(recs)
    assert rep.metrics["AP"] == 0.0
    assert rep.counters["pred_unmapped_count"] == 1
    assert rep.counters["pred_objects"] == 1  # counted, not dropped
    assert rep.metrics["precision@0.5"] == 0.0 and rep.counters["f1_fp_count"] == 1
    # a desc of another GT category does not match either (the box is right, the class is not)
    recs = [_rec(0, [{"desc": "cat", "bbox_2d": BOX}, {"desc": "dog", "bbox_2d": [300, 0, 390, 90]}],
                 [{"desc": "dog", "bbox_2d": BOX}])]  # fmt: skip
    rep = evaluate_detection(recs)
    assert rep.metrics["AP"] == 0.0 and rep.counters["pred_unmapped_count"] == 0


def test_desc_normalisation_matches_case_and_spacing():
    assert normalize_desc("  Black\t  CAT ") == "black cat"
    recs = [_rec(0, [{"desc": "black cat", "bbox_2d": BOX}], [{"desc": " Black  Cat", "bbox_2d": BOX}])]
    rep = evaluate_detection(recs)
    assert rep.metrics["AP"] == pytest.approx(1.0)
    assert list(rep.per_category) == ["black cat"]


def test_score_order_changes_ap():
    # One image, GT A and B; p_miss is far from both, p_hit equals A.
    # hit ranked first: TP, FP -> precision 1 up to recall .5 -> AP = 51/101.
    # miss ranked first (equal scores keep output order): FP, TP -> precision .5 at
    # recall .5 -> interpolated .5 on 51 points -> AP = .5 * 51/101.
    gt = [{"desc": "cat", "bbox_2d": BOX}, {"desc": "cat", "bbox_2d": [200, 100, 300, 200]}]
    miss = {"desc": "cat", "bbox_2d": [300, 250, 390, 290]}
    hit = {"desc": "cat", "bbox_2d": BOX}
    ranked = evaluate_detection([_rec(0, gt, [{**miss, "score": 0.2}, {**hit, "score": 0.9}])])
    tied = evaluate_detection([_rec(0, gt, [{**miss, "score": 1.0}, {**hit, "score": 1.0}])])
    assert ranked.metrics["AP"] == pytest.approx(51 / 101)
    assert tied.metrics["AP"] == pytest.approx(0.5 * 51 / 101)


def test_degenerate_boxes_are_counted_and_never_match():
    recs = [_rec(0, [{"desc": "cat", "bbox_2d": BOX}],
                 [{"desc": "cat", "bbox_2d": [110, 10, 10, 110]}, {"desc": "cat", "bbox_2d": [10, 10, 10, 110]}])]  # fmt: skip
    rep = evaluate_detection(recs)
    assert rep.counters["pred_degenerate_count"] == 2
    assert rep.metrics["AP"] == 0.0 and rep.metrics["F1@0.5"] == 0.0


def test_identical_degenerate_boxes_match_in_f1_as_in_rollout_matching():
    # one IoU (data.boxes): a degenerate box has IoU 0 with every other box, 1 with an exact copy
    import data.boxes
    import rollout.matching

    assert rollout.matching.iou_matrix is data.boxes.iou_matrix
    line = [10.0, 10.0, 10.0, 110.0]  # zero width
    assert box_iou(line, line) == 1.0 and box_iou(line, BOX) == 0.0 and box_iou([10, 10, 11, 110], line) == 0.0
    rep = evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": line}], [{"desc": "cat", "bbox_2d": line}])])
    assert rep.counters["gt_degenerate_count"] == 1 and rep.counters["pred_degenerate_count"] == 1
    assert rep.counters["f1_tp_count"] == 1 and rep.metrics["F1@0.5"] == 1.0
    m = rollout.matching.hungarian_match([[10, 10, 10, 110]], [[10, 10, 10, 110]])
    assert m.pairs == [(0, 0)] and m.ious == [1.0]

def test_bins_records_equal_pixel_records():
    # 400x300 image; bins k -> k/999 * size.
    bins = [99, 333, 500, 999]
    px = list(bins_to_pixels(bins, 400, 300))
    assert px == pytest.approx([99 / 999 * 400, 333 / 999 * 300, 500 / 999 * 400, 300.0])
    pred_px = [px[0] + 10, px[1], px[2] + 10, px[3]]
    as_px = evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": px}], [{"desc": "a", "bbox_2d": pred_px}])])
    pred_bins = [99 + 10 * 999 / 400, 333, 500 + 10 * 999 / 400, 999]
    as_bins = evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": bins}], [{"desc": "a", "bbox_2d": pred_bins}], coords="bins")])
    as_arg = evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": bins}], [{"desc": "a", "bbox_2d": pred_bins}])], coords="bins")
    # the prediction is the GT shifted 10 px right: IoU = (w - 10) / (w + 10) with w = 401/999*400 px
    # (0.883), a hit at the IoU thresholds 0.50..0.85 and a miss at 0.90, 0.95: AP = 8/10
    w = (500 - 99) / 999 * 400
    assert (w - 10) / (w + 10) == pytest.approx(0.8827, abs=1e-4)
    assert as_px.metrics["AP"] == pytest.approx(0.8)
    assert as_px.metrics["AP50"] == pytest.approx(1.0) and as_px.metrics["AP75"] == pytest.approx(1.0)
    assert as_bins.metrics == pytest.approx(as_px.metrics)
    assert as_arg.metrics == pytest.approx(as_px.metrics)


def test_dataclass_records_are_accepted():
    rec = DetectionRecord(image_id="a", width=400, height=300, gt=(DetectionObject("cat", tuple(BOX)),),
                          pred=(DetectionObject("cat", tuple(BOX), 0.3),))  # fmt: skip
    assert evaluate_detection([rec]).metrics["AP"] == pytest.approx(1.0)


def test_greedy_f1_prefers_higher_score_and_best_iou():
    # Two GT side by side; two predictions. The high-score one overlaps both GT, best with
    # the left GT (IoU 2/3), so it takes it; the low-score one then matches the right GT.
    left, right = BOX, [120, 10, 220, 110]
    preds = [{"desc": "cat", "bbox_2d": [120, 10, 220, 110], "score": 0.1},
             {"desc": "cat", "bbox_2d": _shift(BOX, 20), "score": 0.9}]  # fmt: skip
    rep = evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": left}, {"desc": "cat", "bbox_2d": right}], preds)])
    assert rep.counters["f1_tp_count"] == 2 and rep.metrics["F1@0.5"] == 1.0
    rep75 = evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": left}, {"desc": "cat", "bbox_2d": right}], preds)],
                               f1_iou=0.75)  # fmt: skip
    # at .75 the IoU-2/3 prediction misses: TP 1, FP 1, FN 1 -> F1 .5
    assert rep75.metrics["F1@0.75"] == pytest.approx(0.5)


@pytest.mark.parametrize("high_first", [True, False])
def test_greedy_f1_goes_by_score_whatever_the_list_order(high_first):
    # GT1 [0,0,100,100], GT2 [60,0,160,100]. H (score .9) = [28,0,128,100]: IoU 72/128 = .5625 with
    # GT1, 68/132 = .515 with GT2, so it takes GT1. L (score .1) = GT1 exactly: IoU 1 with GT1,
    # 40/160 = .25 with GT2, so nothing is left for it. By score: TP 1, FP 1, FN 1 -> F1 .5.
    # (L first would take GT1 and leave GT2 to H: TP 2.)
    gt = [{"desc": "cat", "bbox_2d": [0, 0, 100, 100]}, {"desc": "cat", "bbox_2d": [60, 0, 160, 100]}]
    high = {"desc": "cat", "bbox_2d": [28, 0, 128, 100], "score": 0.9}
    low = {"desc": "cat", "bbox_2d": [0, 0, 100, 100], "score": 0.1}
    rep = evaluate_detection([_rec(0, gt, [high, low] if high_first else [low, high])])
    assert rep.counters["f1_tp_count"] == 1 and rep.counters["f1_fp_count"] == 1 and rep.counters["f1_fn_count"] == 1
    assert rep.metrics["F1@0.5"] == pytest.approx(0.5)


def test_an_iou_exactly_on_the_f1_threshold_is_a_hit():
    gt = [{"desc": "cat", "bbox_2d": [0, 0, 100, 100]}]
    half = [{"desc": "cat", "bbox_2d": [0, 0, 100, 50]}]  # IoU 5000 / 10000 = 0.5 exactly
    three_quarters = [{"desc": "cat", "bbox_2d": [0, 0, 100, 75]}]  # IoU 0.75 exactly
    assert box_iou([0, 0, 100, 50], [0, 0, 100, 100]) == 0.5
    assert evaluate_detection([_rec(0, gt, half)]).metrics["F1@0.5"] == 1.0
    assert evaluate_detection([_rec(0, gt, three_quarters)], f1_iou=0.75).metrics["F1@0.75"] == 1.0
    assert evaluate_detection([_rec(0, gt, half)], f1_iou=0.75).metrics["F1@0.75"] == 0.0

def test_errors_name_the_record_and_the_fix():
    with pytest.raises(ValueError, match=r"records\[0\] gt\[0\].*bbox_2d"):
        evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": [1, 2, 3]}], [])])
    with pytest.raises(ValueError, match=r"records\[1\].*image_id 0 already used"):
        evaluate_detection([_rec(0, [], []), _rec(0, [], [])])
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate_detection([], backend="detectron")
    with pytest.raises(ValueError, match="finite"):
        evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": [0, 0, math.inf, 1]}], [])])


def test_faster_coco_eval_missing_says_what_to_install():
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install faster-coco-eval"):
            evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": BOX}], [{"desc": "a", "bbox_2d": BOX}])],
                               backend="faster_coco_eval")  # fmt: skip
    else:
        rep = evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": BOX}], [{"desc": "a", "bbox_2d": BOX}])],
                                 backend="faster_coco_eval")  # fmt: skip
        assert rep.metrics["AP"] == pytest.approx(1.0)


def test_coco_prints_are_silenced(capsys):
    evaluate_detection([_rec(0, [{"desc": "a", "bbox_2d": BOX}], [{"desc": "a", "bbox_2d": BOX}])])
    assert capsys.readouterr().out == ""


def _pycocotools_stats(recs):
    """COCOeval stats computed directly with pycocotools (independent of evaluate_detection)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = sorted({o["desc"] for r in recs for o in r["gt"]})
    cid = {c: i + 1 for i, c in enumerate(cats)}
    images = [{"id": i + 1, "width": r["width"], "height": r["height"]} for i, r in enumerate(recs)]

    def anns(key):
        out = []
        for i, r in enumerate(recs):
            for o in r[key]:
                x1, y1, x2, y2 = o["bbox_2d"]
                a = {"id": len(out) + 1, "image_id": i + 1, "category_id": cid[o["desc"]],
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                if key == "pred":
                    a["score"] = o.get("score", 1.0)
                out.append(a)
        return out

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": [{"id": v, "name": k} for k, v in cid.items()], "annotations": anns("gt")}
        gt.createIndex()
        dt = gt.loadRes(anns("pred"))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"), ev.stats))


def test_size_range_metrics_are_minus_one_exactly_where_pycocotools_says_so():
    # only large GT (200x200 px): small and medium ranges have no GT
    recs = [_rec(0, [{"desc": "cat", "bbox_2d": [10, 10, 210, 210]}],
                 [{"desc": "cat", "bbox_2d": [12, 10, 210, 212], "score": 0.9},
                  {"desc": "cat", "bbox_2d": [0, 0, 20, 20], "score": 0.3}])]  # fmt: skip
    rep = evaluate_detection(recs)
    ref = _pycocotools_stats(recs)
    assert ref["APs"] == -1 and ref["APm"] == -1 and ref["ARm"] == -1 and ref["APl"] > 0
    for k, v in ref.items():
        assert rep.metrics[k] == pytest.approx(float(v)), k


def test_malformed_predictions_are_dropped_and_counted_not_fatal():
    gt = [{"desc": "cat", "bbox_2d": BOX}]
    preds = [
        {"desc": "cat", "bbox_2d": [[1, 2], [10, 12]], "score": 0.9},  # nested points
        {"desc": "cat", "bbox_2d": BOX, "score": 1.5},  # score outside [0, 1]
        {"desc": "cat", "bbox_2d": BOX, "score": -0.1},
        {"desc": "cat", "bbox_2d": BOX, "score": float("nan")},
        {"bbox_2d": BOX},  # no desc
        "cat",  # not an object
        {"desc": "cat", "bbox_2d": BOX, "score": 0.5},  # the one valid prediction
    ]
    rep = evaluate_detection([_rec(0, gt, preds)])
    c = rep.counters
    assert c["pred_objects"] == 1 and c["pred_invalid_count"] == 6
    assert (c["pred_invalid_box_count"], c["pred_invalid_score_count"], c["pred_invalid_object_count"]) == (1, 3, 2)
    assert rep.metrics["AP"] == pytest.approx(1.0)


def test_score_bounds_are_inclusive():
    gt = [{"desc": "cat", "bbox_2d": BOX}]
    rep = evaluate_detection([_rec(0, gt, [{"desc": "cat", "bbox_2d": BOX, "score": 0}, {"desc": "cat", "bbox_2d": BOX, "score": 1}])])
    assert rep.counters["pred_invalid_count"] == 0 and rep.counters["pred_objects"] == 2


def test_malformed_gt_is_still_an_error():
    with pytest.raises(ValueError, match=r"records\[0\] gt\[0\]: bbox_2d"):
        evaluate_detection([_rec(0, [{"desc": "cat", "bbox_2d": [[1, 2], [3, 4]]}], [])])
