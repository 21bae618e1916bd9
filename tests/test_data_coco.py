"""COCO instances JSON -> JSONL converter."""

from __future__ import annotations

import json

from data.records import read_jsonl
from scripts.coco_to_jsonl import main
from tests._data_fixtures import write_png


def test_coco_to_jsonl(tmp_path, capsys):
    coco = {
        "images": [
            {"id": 1, "file_name": "one.png", "width": 100, "height": 50},
            {"id": 2, "file_name": "two.png", "width": 40, "height": 40},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 4, "name": "traffic light"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 5], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 4, "bbox": [0, 0, 100, 50], "iscrowd": 1},
            {"id": 12, "image_id": 1, "category_id": 4, "bbox": [90.5, 1, 10, 10], "iscrowd": 0},  # overshoots x
        ],
    }
    src = tmp_path / "inst.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "out" / "coco.jsonl"
    report = main(["--coco", str(src), "--out", str(out), "--image-prefix", "imgs"])
    assert report["skipped_iscrowd"] == 1 and report["clipped_boxes"] == 1
    assert (report["images"], report["objects"], report["images_without_objects"]) == (2, 2, 1)
    assert "skipped_iscrowd=1" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {
        "image": "imgs/one.png",
        "width": 100,
        "height": 50,
        "image_id": 1,
        "objects": [
            {"desc": "cat", "bbox_2d": [10.0, 20.0, 40.0, 25.0]},  # xywh -> xyxy
            {"desc": "traffic light", "bbox_2d": [90.5, 1.0, 100.0, 11.0]},  # x2 clipped from 100.5
        ],
    }
    assert rows[1]["objects"] == [] and rows[1]["image_id"] == 2

    write_png(str(tmp_path / "out" / "imgs" / "one.png"), 100, 50)
    write_png(str(tmp_path / "out" / "imgs" / "two.png"), 40, 40)
    recs, rep = read_jsonl(out)
    # cat: x 10/100 -> 99.9 -> 100, y 20/50 -> 399.6 -> 400, x2 40/100 -> 399.6 -> 400, y2 25/50 -> 499.5 -> 500 (even)
    assert recs[0].objects[1].bins == (100, 400, 400, 500) and recs[0].objects[1].desc == "cat"
    assert recs[0].image_id == "1" and rep.empty_records == 1

    limited = main(["--coco", str(src), "--out", str(out), "--limit", "1"])
    assert limited["images"] == 1 and limited["images_beyond_limit"] == 1
