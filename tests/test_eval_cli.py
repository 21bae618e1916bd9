"""eval.evaluate and eval.visualize CLIs on a synthetic predictions.jsonl."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from configs.errors import run_cli
from eval import evaluate as evaluate_cli
from eval import visualize
from eval.detection import evaluate_detection, read_predictions_jsonl, write_predictions_jsonl

RECORDS = [
    {"image_id": "img0", "image": "img0.png", "width": 200, "height": 100,
     "gt": [{"desc": "cat", "bbox_2d": [10.5, 10.25, 90.0, 80.0]}, {"desc": "dog", "bbox_2d": [120, 20, 190, 95]}],
     "pred": [{"desc": "cat", "bbox_2d": [12.125, 11.0, 88.3, 79.9], "score": 0.8712345678901234},
              {"desc": "dog", "bbox_2d": [100, 20, 170, 95], "score": 0.4},
              {"desc": "bird", "bbox_2d": [1, 1, 5, 5], "score": 0.1}]},
    {"image_id": "img1", "image": "img1.png", "width": 200, "height": 100,
     "gt": [{"desc": "cat", "bbox_2d": [50, 30, 150, 90]}],
     "pred": [{"desc": "cat", "bbox_2d": [60, 30, 160, 90], "score": 0.6}]},
]  # fmt: skip


def test_offline_evaluator_reproduces_in_memory_metrics(tmp_path, capsys):
    in_memory = evaluate_detection(RECORDS)
    path = write_predictions_jsonl(tmp_path / "predictions.jsonl", RECORDS)
    assert [r["image_id"] for r in read_predictions_jsonl(path)] == ["img0", "img1"]
    out = tmp_path / "metrics.json"
    assert evaluate_cli.main(["--predictions", str(path), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["metrics"] == in_memory.metrics  # exact, not approx
    assert saved["per_category"] == in_memory.per_category
    assert saved["counters"] == {**in_memory.counters, "lines_skipped_count": 0}
    assert saved["counters"]["pred_unmapped_count"] == 1
    printed = capsys.readouterr().out
    assert "per-category AP (2 categories)" in printed and "dog" in printed


def test_predictions_reader_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"image_id": 1, "width": 5}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing required key 'height'"):
        read_predictions_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_predictions_jsonl(path)


def _count(img, box, color):
    return sum(1 for px in img.crop(box).getdata() if px == color)


def _ink(img, box, color):
    """Pixels in ``box`` closer to ``color`` than to white (text is anti-aliased)."""
    def dist(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))

    return sum(1 for px in img.crop(box).getdata() if dist(px, color) < dist(px, (255, 255, 255)))


def test_visualize_draws_gt_and_pred_box_edges(tmp_path):
    for rec in RECORDS:
        Image.new("RGB", (rec["width"], rec["height"]), (255, 255, 255)).save(tmp_path / rec["image"])
    preds = write_predictions_jsonl(tmp_path / "predictions.jsonl", RECORDS)
    out_dir = tmp_path / "viz"
    assert visualize.main(["--predictions", str(preds), "--out-dir", str(out_dir), "--images-per-page", "4",
                           "--cell-size", "200"]) == 0  # fmt: skip
    pages = sorted(out_dir.glob("*.png"))
    assert [p.name for p in pages] == ["page_000.png"]
    page = Image.open(pages[0]).convert("RGB")
    assert page.size == (400, 400)  # 2x2 grid of 200 px cells
    for cell in ((0, 0, 200, 200), (200, 0, 400, 200)):
        image = (cell[0], cell[1] + visualize.MARGIN + visualize.HEADER_H, cell[2], cell[3])  # below the legend
        assert _count(page, image, visualize.GT_COLOR) > 50 and _count(page, image, visualize.PRED_COLOR) > 50
        header = (cell[0], 0, cell[2], visualize.MARGIN)  # the image id is written above the image
        assert _ink(page, header, (0, 0, 0)) > 10


def test_visualize_cell_geometry(tmp_path):
    """A box edge lands where the scale and the margins put it (200x100 image in a 200 px cell)."""
    rec = RECORDS[1]
    Image.new("RGB", (rec["width"], rec["height"]), (255, 255, 255)).save(tmp_path / rec["image"])
    cell = visualize.render_record(rec, tmp_path, cell_size=200)
    scale = (200 - 2 * visualize.MARGIN) / 200  # the width limits the scale here
    assert cell.size == (200, round(100 * scale) + 2 * visualize.MARGIN + visualize.HEADER_H)
    x0, y0 = visualize.MARGIN, visualize.MARGIN + visualize.HEADER_H
    gt_left = round(x0 + 50 * scale)  # GT cat x1 = 50; the prediction starts at x = 60
    assert cell.getpixel((gt_left, round(y0 + 60 * scale))) == visualize.GT_COLOR
    pred_right = round(x0 + 160 * scale) - 1  # prediction x2 = 160 (outline drawn inward)
    assert cell.getpixel((pred_right, round(y0 + 60 * scale))) == visualize.PRED_COLOR


def _edge_strips(box, width):
    x1, y1, x2, y2 = box
    return [(x1 - width, y1 - width, x2 + width, y1 + width), (x1 - width, y2 - width, x2 + width, y2 + width),
            (x1 - width, y1 - width, x1 + width, y2 + width), (x2 - width, y1 - width, x2 + width, y2 + width)]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_visualize_labels_never_cross_a_box_or_each_other(tmp_path):
    """Crowded image: boxes at the image edge, nested, side by side; every label stays off every outline."""
    rec = {"image_id": "crowd_7", "image": "c.png", "width": 100, "height": 100,
           "gt": [{"desc": "edge", "bbox_2d": [0, 0, 40, 30]}, {"desc": "big", "bbox_2d": [10, 40, 90, 99]},
                  {"desc": "nested", "bbox_2d": [30, 55, 60, 80]}],
           "pred": [{"desc": "edge", "bbox_2d": [2, 1, 42, 31], "score": 0.91},
                    {"desc": "side", "bbox_2d": [45, 0, 99, 30], "score": 0.5},
                    {"desc": "nested", "bbox_2d": [31, 56, 61, 81], "score": 0.25}]}  # fmt: skip
    Image.new("RGB", (100, 100), (255, 255, 255)).save(tmp_path / "c.png")
    cell = visualize.render_record(rec, tmp_path, cell_size=300)
    labels, boxes = cell.info["label_rects"], cell.info["box_rects"]
    assert len(labels) == len(boxes) == 6
    for i, label in enumerate(labels):
        assert 0 <= label[0] and 0 <= label[1] and label[2] <= cell.width and label[3] <= cell.height
        for box in boxes:
            for strip in _edge_strips(box, visualize.LINE_WIDTH):
                assert not _overlap(label, strip), (i, label, box)
        for j, other in enumerate(labels):
            assert j == i or not _overlap(label, other), (i, j)
        color = visualize.GT_COLOR if i < 3 else visualize.PRED_COLOR
        assert _ink(cell, tuple(round(v) for v in label), color) > 3  # the text is drawn there


def test_visualize_missing_image_fails_with_the_fix(tmp_path):
    preds = write_predictions_jsonl(tmp_path / "predictions.jsonl", RECORDS[:1])
    with pytest.raises(FileNotFoundError, match="--blank-missing"):
        visualize.main(["--predictions", str(preds), "--out-dir", str(tmp_path / "v")])
    assert visualize.main(["--predictions", str(preds), "--out-dir", str(tmp_path / "v"), "--blank-missing",
                           "--images-per-page", "1"]) == 0  # fmt: skip
    assert (tmp_path / "v" / "page_000.png").is_file()


def test_invalid_line_strict_by_default_lenient_skips_and_counts(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    lines = [json.dumps(RECORDS[0]).encode(), b"{not json", json.dumps({"image_id": 9, "width": 5}).encode(),
             b'{"image_id": "x", "width": 4, "height": 4, "gt": [], "pred": [], "raw_text": "caf\xe9"}',
             json.dumps(RECORDS[1]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"preds.jsonl:2: not valid JSON.*--lenient"):
        evaluate_cli.main(["--predictions", str(path)])
    # from the command line: one line naming file:line and the fix, exit status 2, no traceback
    assert run_cli(evaluate_cli.main, ["--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "preds.jsonl:2: not valid JSON" in err and "--lenient" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "m.json"
    assert evaluate_cli.main(["--predictions", str(path), "--lenient", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["counters"]["lines_skipped_count"] == 3 and saved["counters"]["images"] == 2
    err = capsys.readouterr().err
    assert "preds.jsonl:2" in err and "preds.jsonl:3" in err and "preds.jsonl:4: line is not UTF-8" in err
    # the kept lines give exactly the metrics of the valid records alone
    assert saved["metrics"] == evaluate_detection(RECORDS).metrics


def test_malformed_prediction_in_a_file_is_dropped_and_counted(tmp_path, capsys):
    bad = dict(RECORDS[1], pred=RECORDS[1]["pred"] + [{"desc": "cat", "bbox_2d": [[1, 2], [10, 12]], "score": 0.5},
                                                      {"desc": "cat", "bbox_2d": [60, 30, 160, 90], "score": 7}])
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(bad) + "\n")
    records = read_predictions_jsonl(path)  # strict: a bad prediction is not a bad line
    assert records[1]["pred"] == RECORDS[1]["pred"] and records[1]["pred_invalid"] == ["box", "score"]
    out = tmp_path / "m.json"
    assert evaluate_cli.main(["--predictions", str(path), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["counters"]["pred_invalid_count"] == 2 and saved["metrics"] == evaluate_detection(RECORDS).metrics
    assert "(not evaluated: no small GT)" in capsys.readouterr().out


def test_out_dir_artifacts_hold_the_hand_worked_content(tmp_path):
    """RECORDS at IoU 0.5, scope full: img0 cat pred IoU 0.95 (a TP), dog pred IoU 50*75/(90*75) = 0.556 (a TP),
    bird unmapped (FP); img1 cat pred IoU 90*60/(110*60) = 0.818 (a TP)."""
    import csv

    path = write_predictions_jsonl(tmp_path / "predictions.jsonl", RECORDS)
    assert evaluate_cli.main(["--predictions", str(path), "--out-dir", str(tmp_path / "ev")]) == 0
    ev = tmp_path / "ev"
    assert json.loads((ev / "metrics.json").read_text())["f1ish"]["f1ish@0.5_full_tp"] == 3
    per_image = json.loads((ev / "per_image.json").read_text())["images"]
    assert [(p["image_id"], p["pred_unmapped"]) for p in per_image] == [("img0", 1), ("img1", 0)]
    assert per_image[0]["f1ish"]["f1ish@0.5_full"] == {
        "tp": 2, "fp": 1, "fn": 0, "pred_ignored": 0, "precision": 2 / 3, "recall": 1.0, "f1": 0.8}
    assert per_image[0]["f1ish"]["f1ish@0.5_annotated"]["pred_ignored"] == 1
    lines = [json.loads(x) for x in (ev / "matches.jsonl").read_text().splitlines()]
    m0 = lines[0]["matches"]
    assert [(m["pred_index"], m["gt_index"], m["desc_match"], m["mapping"]) for m in m0] == [
        (0, 0, True, "exact"), (1, 1, True, "exact")]
    assert m0[1]["iou"] == pytest.approx(50 * 75 / (90 * 75)) and lines[0]["unmatched_pred"] == [2]
    rows = list(csv.reader((ev / "per_class.csv").open()))
    assert rows[0][:3] == ["category", "gt", "pred"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["cat"][1:3] == ["2", "2"] and by_name["cat"][4:] == ["2", "0", "0"]
    assert by_name["<unmapped>"][4:] == ["0", "1", "0"]
    gt = json.loads((ev / "coco_gt.json").read_text())
    preds = json.loads((ev / "coco_preds.json").read_text())
    assert [c["name"] for c in gt["categories"]] == ["cat", "dog"] and len(gt["annotations"]) == 3
    assert len(preds) == 3 and set(preds[0]) == {"image_id", "category_id", "bbox", "score"}


def test_a_missing_semantic_model_or_a_bad_threshold_is_one_error_line(tmp_path, capsys):
    path = write_predictions_jsonl(tmp_path / "predictions.jsonl", RECORDS)
    rc = run_cli(evaluate_cli.main, ["--predictions", str(path), "--semantic-model", str(tmp_path / "no_model"),
                                     "--semantic-threshold", "0.7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: eval.semantic.model=")
    rc = run_cli(evaluate_cli.main, ["--predictions", str(path), "--semantic-threshold", "1.5",
                                     "--semantic-model", "x"])
    assert rc == 2 and "eval.semantic.threshold" in capsys.readouterr().err


def test_visualize_has_a_legend_and_two_tone_boxes(tmp_path):
    """A green GT box on a green image stays visible: a dark outline on both sides of the stroke."""
    rec = {"image_id": "g", "image": "g.png", "width": 100, "height": 100,
           "gt": [{"desc": "leaf", "bbox_2d": [20, 20, 80, 80]}], "pred": []}
    Image.new("RGB", (100, 100), visualize.GT_COLOR).save(tmp_path / "g.png")
    cell = visualize.render_record(rec, tmp_path, cell_size=100 + 2 * visualize.MARGIN + visualize.HEADER_H)
    x1, y1, x2, y2 = (round(v) for v in cell.info["box_rects"][0])
    ym = (y1 + y2) // 2
    # left edge, outside in: dark outline, 3 px of green stroke, dark outline, then the green image
    row = [cell.getpixel((x, ym)) for x in range(x1 - 1, x1 + visualize.LINE_WIDTH + 1)]
    assert row == [visualize.OUTLINE_COLOR] + [visualize.GT_COLOR] * visualize.LINE_WIDTH + [visualize.OUTLINE_COLOR]
    assert cell.getpixel((x1 - 2, ym)) == visualize.GT_COLOR  # the image itself
    # legend in the header: both colours, whatever the record holds (no prediction here)
    header = (0, 0, cell.width, visualize.MARGIN + visualize.HEADER_H - 2)
    assert _count(cell, header, visualize.GT_COLOR) > 10 and _count(cell, header, visualize.PRED_COLOR) > 10
