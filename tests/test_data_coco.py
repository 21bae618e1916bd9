"""COCO instances JSON -> JSONL converter."""

from __future__ import annotations

import json

import pytest

from data.records import read_jsonl
from scripts.coco_to_jsonl import convert, detect_format, main
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


def _lvis(tmp_path):
    lvis = {
        "images": [
            {
                "id": 7,
                "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg",
                "width": 60,
                "height": 30,
                "not_exhaustive_category_ids": [2],
                "neg_category_ids": [3, 1],
            },
            {
                "id": 8,
                "coco_url": "http://images.cocodataset.org/train2017/000000000008.jpg",
                "width": 20,
                "height": 20,
                "not_exhaustive_category_ids": [],
                "neg_category_ids": [],
            },
        ],
        "categories": [{"id": 1, "name": "aerosol_can"}, {"id": 2, "name": "apple"}, {"id": 3, "name": "zebra"}],
        # LVIS annotations have no iscrowd key.
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 2, "bbox": [6, 3, 12, 6]},
            {"id": 2, "image_id": 8, "category_id": 1, "bbox": [15, 0, 10, 5]},  # x2 25 clipped to 20
        ],
    }
    src = tmp_path / "lvis_v1_val.json"
    src.write_text(json.dumps(lvis))
    return lvis, src


def test_lvis_to_jsonl_auto_detected(tmp_path, capsys):
    _, src = _lvis(tmp_path)
    out = tmp_path / "lvis.jsonl"
    report = main(["--coco", str(src), "--out", str(out), "--image-prefix", "imgs"])
    assert report["format_lvis"] == 1 and report["skipped_iscrowd"] == 0 and report["clipped_boxes"] == 1
    assert (report["images"], report["objects"], report["images_without_objects"]) == (2, 2, 0)
    # neg lists: image 7 has 2 names, image 8 none; not-exhaustive: 1 name on image 7.
    assert (report["neg_descs"], report["images_with_neg_descs"]) == (2, 1)
    assert (report["not_exhaustive_descs"], report["images_with_not_exhaustive_descs"]) == (1, 1)
    assert "format_lvis=1" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {
        "image": "imgs/000000000007.jpg",  # last path component of coco_url
        "width": 60,
        "height": 30,
        "image_id": 7,
        "objects": [{"desc": "apple", "bbox_2d": [6.0, 3.0, 18.0, 9.0]}],
        "not_exhaustive_descs": ["apple"],
        "neg_descs": ["aerosol_can", "zebra"],  # ids [3, 1] -> names, sorted
    }
    assert rows[1]["objects"] == [{"desc": "aerosol_can", "bbox_2d": [15.0, 0.0, 20.0, 5.0]}]
    assert rows[1]["neg_descs"] == [] and rows[1]["not_exhaustive_descs"] == []

    # The extra keys pass through the record contract (ignored by the reader).
    write_png(str(tmp_path / "imgs" / "000000000007.jpg"), 60, 30)
    write_png(str(tmp_path / "imgs" / "000000000008.jpg"), 20, 20)
    recs, rep = read_jsonl(out)
    assert rep.records == 2 and rep.skipped_total == 0
    # apple: x1 6/60 -> 99.9 -> 100, y1 3/30 -> 100, x2 18/60 -> 299.7 -> 300, y2 9/30 -> 300
    assert recs[0].objects[0].bins == (100, 100, 300, 300) and recs[0].image_id == "7"
    # aerosol_can: x1 15/20 -> 749.25 -> 749, y1 0, x2 20/20 -> 999, y2 5/20 -> 249.75 -> 250
    assert recs[1].objects[0].bins == (749, 0, 999, 250)


def test_lvis_format_flag_and_errors(tmp_path):
    lvis, src = _lvis(tmp_path)
    out = tmp_path / "o.jsonl"
    # Forcing coco on an LVIS file: no file_name -> the message points at --format lvis.
    with pytest.raises(ValueError, match="pass --format lvis"):
        main(["--coco", str(src), "--out", str(out), "--format", "coco"])
    assert main(["--coco", str(src), "--out", str(out), "--format", "lvis"])["format_lvis"] == 1
    lvis["images"][0]["neg_category_ids"] = [99]
    src.write_text(json.dumps(lvis))
    with pytest.raises(ValueError, match=r"image 7: neg_category_ids has unknown category ids \[99\]"):
        main(["--coco", str(src), "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--coco", str(src), "--out", str(out), "--format", "voc"])


def test_coco_file_is_not_detected_as_lvis():
    coco = {"images": [{"id": 1, "file_name": "a.png", "coco_url": "http://x/a.png", "width": 4, "height": 4}]}
    assert detect_format(coco) == "coco"
    rows, report = convert({**coco, "annotations": [], "categories": []})
    assert report["format_coco"] == 1 and "neg_descs" not in rows[0]
