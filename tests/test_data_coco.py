"""COCO instances JSON -> JSONL converter."""

from __future__ import annotations

import json
import re

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


def _coco_with(annotations, images=None):
    return {
        "images": images or [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                             {"id": 2, "file_name": "b.jpg", "width": 40, "height": 40}],
        "categories": [{"id": 3, "name": "cat", "supercategory": "animal"}],
        "annotations": annotations,
    }


GOOD = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]}


@pytest.mark.parametrize(
    ("bad", "reason", "says"),
    [
        ({"bbox": [1, 2, 3]}, "bad_bbox", "bbox=[1, 2, 3] is not 4 finite numbers"),
        ({"bbox": [1, 2, float("nan"), 3]}, "bad_bbox", "is not 4 finite numbers"),
        ({"bbox": [1, 2, "3", 4]}, "bad_bbox", "is not 4 finite numbers"),
        ({"bbox": [1, 2, True, 4]}, "bad_bbox", "is not 4 finite numbers"),
        ({"bbox": None}, "bad_bbox", "bbox=None"),
        ({"bbox": [10, 10, -5, 4]}, "negative_size", "negative width or height"),
        ({"bbox": [120, 10, 5, 4]}, "outside_image", "lies outside its 40x40 image 2"),
        ({"bbox": [-9, 10, 5, 4]}, "outside_image", "lies outside"),
        ({"image_id": 99}, "unknown_image", "image_id 99 is not in images"),
        ({"category_id": 7}, "unknown_category", "category_id 7 is not in categories"),
    ],
)
def test_a_malformed_annotation_is_one_error_naming_its_id_or_skipped_and_counted(tmp_path, capsys, bad, reason, says):
    from configs.errors import run_cli

    coco = _coco_with([GOOD, {**GOOD, "id": 42, "image_id": 2, **bad}])
    src = tmp_path / "instances_val2017.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "val2017.jsonl"
    with pytest.raises(ValueError, match="annotation 42: .*" + re.escape(says)) as err:
        main(["--coco", str(src), "--out", str(out)])
    assert "--skip-invalid" in str(err.value) and "\n" not in str(err.value)
    assert run_cli(main, ["--coco", str(src), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src}: annotation 42: ")

    report = main(["--coco", str(src), "--out", str(out), "--skip-invalid"])
    assert report[f"skipped_{reason}"] == 1 and report["annotations"] == 2 and report["objects"] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # image 2 lost its only annotation: left out, not written as "no objects" (with image_id 99 it had none)
    lost = reason != "unknown_image"
    assert [r["image_id"] for r in rows] == ([1] if lost else [1, 2])
    assert report["images_all_annotations_skipped"] == int(lost)


def test_an_annotation_without_an_id_is_named_by_its_position():
    coco = _coco_with([GOOD, {"image_id": 1, "category_id": 3, "bbox": [1, 2]}])
    with pytest.raises(ValueError, match=r"annotation #1 \(no id\): bbox=\[1, 2\]"):
        convert(coco, source="x.json")


def test_zero_area_boxes_are_kept_and_counted():
    coco = _coco_with([
        GOOD,
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 5, 0, 10]},  # zero width, inside
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 40, 7, 0]},  # zero height on the bottom edge
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [35, 1, 10, 0]},  # zero height, x2 45 clipped to 40
    ])
    rows, report = convert(coco)
    assert report["zero_area_boxes"] == 3 and report["clipped_boxes"] == 1 and report["objects"] == 4
    assert rows[0]["objects"][1] == {"desc": "cat", "bbox_2d": [30.0, 5.0, 30.0, 15.0]}
    assert rows[1]["objects"] == [{"desc": "cat", "bbox_2d": [0.0, 40.0, 7.0, 40.0]},
                                  {"desc": "cat", "bbox_2d": [35.0, 1.0, 40.0, 1.0]}]
    assert report["images_without_objects"] == 0


def test_a_crowd_only_image_is_left_out_and_counted():
    coco = _coco_with([GOOD, {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1}],
                      images=[{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
                              {"id": 2, "file_name": "b.jpg", "width": 40, "height": 40},
                              {"id": 3, "file_name": "c.jpg", "width": 40, "height": 40}])
    rows, report = convert(coco)
    assert [r["image_id"] for r in rows] == [1, 3]  # 3 has no annotation at all: a real "no objects" example
    assert (report["skipped_iscrowd"], report["images_all_annotations_skipped"], report["images_without_objects"]) == (1, 1, 1)


def test_a_bad_image_size_names_the_image():
    coco = _coco_with([GOOD], images=[{"id": 1, "file_name": "a.jpg", "width": 0, "height": 50}])
    with pytest.raises(ValueError, match="image 1: width=0 is not a positive integer"):
        convert(coco)


def test_objects365_is_detected_its_flags_counted_and_subfolders_kept(tmp_path):
    o365 = {
        "images": [{"id": 5, "file_name": "images/v1/patch8/objects365_v1_00420917.jpg", "width": 64, "height": 32,
                    "url": "https://example/x.jpg", "license": 5}],
        "categories": [{"id": 1, "name": "Person"}, {"id": 2, "name": "Sneakers"}],
        "annotations": [
            {"id": 9, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0, "isfake": 0,
             "isreflected": 1, "area": 12},
            {"id": 10, "image_id": 5, "category_id": 2, "bbox": [10, 2, 3, 4], "iscrowd": 0, "isfake": 1,
             "isreflected": 0, "area": 12},
            {"id": 11, "image_id": 5, "category_id": 2, "bbox": [0, 0, 64, 32], "iscrowd": 1, "isfake": 0,
             "isreflected": 0, "area": 2048},
        ],
    }
    assert detect_format(o365) == "objects365"
    src = tmp_path / "zhiyuan_objv2_val.json"
    src.write_text(json.dumps(o365))
    out = tmp_path / "o365.jsonl"
    report = main(["--coco", str(src), "--out", str(out), "--image-prefix", "val"])
    assert report["format_objects365"] == 1 and report["skipped_iscrowd"] == 1 and report["objects"] == 2
    assert (report["objects365_isfake"], report["objects365_isreflected"]) == (1, 1)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["image"] == "val/images/v1/patch8/objects365_v1_00420917.jpg"
    assert row["objects"] == [{"desc": "Person", "bbox_2d": [1.0, 2.0, 4.0, 6.0]},
                              {"desc": "Sneakers", "bbox_2d": [10.0, 2.0, 13.0, 6.0]}]
    # detected by the file name alone too
    plain = {**o365, "annotations": [{k: v for k, v in a.items() if k not in ("isfake", "isreflected")}
                                     for a in o365["annotations"]]}
    assert detect_format(plain) == "objects365"


def test_the_category_table_carries_lvis_frequency_and_synonyms(tmp_path):
    lvis, src = _lvis(tmp_path)
    lvis["categories"][0].update(frequency="r", synonyms=["aerosol_can", "spray_can"], image_count=3)
    src.write_text(json.dumps(lvis))
    main(["--coco", str(src), "--out", str(tmp_path / "lvis_val.jsonl")])
    table = json.loads((tmp_path / "lvis_val.categories.json").read_text())
    assert table[0] == {"id": 1, "name": "aerosol_can", "frequency": "r", "synonyms": ["aerosol_can", "spray_can"],
                        "image_count": 3}
    assert table[1] == {"id": 2, "name": "apple"}
