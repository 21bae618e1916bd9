"""eval.evaluate and eval.visualize CLIs on a synthetic predictions.jsonl."""

from __future__ import annotations

import json

import pytest
from PIL import Image

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
    assert saved["counters"]["pred_unknown_desc_count"] == 1
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
    # cell 0 holds img0 at scale 1 (200 px wide): GT dog left edge x=120, y in 20..95 is green;
    # predicted dog left edge x=100 is red; a pixel far from any box stays white.
    assert page.getpixel((120, 60)) == visualize.GT_COLOR
    assert page.getpixel((100, 60)) == visualize.PRED_COLOR
    assert page.getpixel((105, 5)) == (255, 255, 255)
    # cell 1 (x offset 200) holds img1: GT cat top edge y=30 at x=55 (the prediction starts
    # at x=60) -> (255, 30); the prediction's right edge x=160 -> (360, 60)
    assert page.getpixel((255, 30)) == visualize.GT_COLOR
    assert page.getpixel((360, 60)) == visualize.PRED_COLOR


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
