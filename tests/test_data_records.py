"""JSONL record contract: bins, ordering, every error names file:line and field, skip counts."""

from __future__ import annotations

import os

import pytest

from data.records import DataError, bin_to_pixel, pixel_to_bin, read_jsonl, require_records
from data.types import GTObject
from tests._data_fixtures import write_jsonl, write_png


def _row(objects, image="a.png", width=640, height=480, **kw):
    return {"image": image, "width": width, "height": height, "objects": objects, **kw}


@pytest.fixture
def tmp(tmp_path):
    write_png(str(tmp_path / "a.png"), 640, 480)  # the size the rows below give
    write_png(str(tmp_path / "b.png"), 640, 480)
    return tmp_path


def test_pixel_to_bin_hand_values():
    assert pixel_to_bin(0, 640) == 0
    assert pixel_to_bin(640, 640) == 999
    # 999 * 320 / 640 = 499.5 -> round half to even -> 500
    assert pixel_to_bin(320, 640) == 500
    # 999 * 1 / 6 = 166.5 -> 166 (ties to even)
    assert pixel_to_bin(1, 6) == 166
    # 999 * 100 / 640 = 156.09 -> 156
    assert pixel_to_bin(100, 640) == 156
    # clamp
    assert pixel_to_bin(700, 640) == 999 and pixel_to_bin(-5, 640) == 0
    assert bin_to_pixel(999, 640) == pytest.approx(640.0)
    assert bin_to_pixel(500, 999) == pytest.approx(500.0)


def test_read_valid_orders_by_y_then_x_and_converts(tmp):
    objs = [
        {"desc": "low", "bbox_2d": [0, 240, 64, 480]},
        {"desc": "right", "bbox_2d": [320, 0, 640, 48]},
        {"desc": "left", "bbox_2d": [0, 0, 64, 48]},
    ]
    path = write_jsonl(str(tmp / "d.jsonl"), [_row(objs), "", _row([], image="b.png", image_id=7)])
    recs, rep = read_jsonl(path)
    assert [o.desc for o in recs[0].objects] == ["left", "right", "low"]
    # left: x 0,64 of 640 -> 0, 99.9->100; y 0,48 of 480 -> 0, 99.9->100
    assert recs[0].objects[0] == GTObject("left", (0, 0, 100, 100))
    # right: x1 = 999*320/640 = 499.5 -> 500
    assert recs[0].objects[1].bins == (500, 0, 999, 100)
    assert recs[0].image_path == os.path.join(str(tmp), "a.png")
    assert recs[0].image_id == "a.png" and recs[1].image_id == "7"
    assert recs[0].source == f"{path}:1" and recs[1].source == f"{path}:3"
    assert (rep.records, rep.objects, rep.empty_records, rep.blank_lines, rep.lines) == (2, 3, 1, 1, 2)

    recs, _ = read_jsonl(path, object_order="none")
    assert [o.desc for o in recs[0].objects] == ["low", "right", "left"]


def test_ties_in_position_ordered_by_desc(tmp):
    objs = [{"desc": "b", "bbox_2d": [10, 10, 20, 20]}, {"desc": "a", "bbox_2d": [10, 10, 30, 30]}]
    recs, _ = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), [_row(objs)]))
    assert [o.desc for o in recs[0].objects] == ["a", "b"]


def test_image_root_and_bins_mode(tmp):
    sub = tmp / "sub"
    sub.mkdir()
    path = write_jsonl(str(sub / "d.jsonl"), [_row([{"desc": "x", "bbox_2d": [1, 2, 999, 998]}])])
    with pytest.raises(DataError, match="missing_image"):
        read_jsonl(path)  # a.png is not next to the JSONL
    recs, _ = read_jsonl(path, image_root=str(tmp), coords="bins")
    assert recs[0].objects[0].bins == (1, 2, 999, 998)
    with pytest.raises(DataError, match="box_outside_image"):
        read_jsonl(
            write_jsonl(str(tmp / "e.jsonl"), [_row([{"desc": "x", "bbox_2d": [1, 2, 3, 1000]}])]), coords="bins"
        )


BAD_LINES = [
    ("{not json", "<line>", "not_json"),
    (_row([{"bbox_2d": [0, 0, 1, 1]}]), "objects[0].desc", "missing_desc"),
    (_row([{"desc": "  ", "bbox_2d": [0, 0, 1, 1]}]), "objects[0].desc", "empty_desc"),
    (_row([{"desc": "a", "bbox_2d": [10, 0, 5, 1]}]), "objects[0].bbox_2d", "inverted_box"),
    (_row([{"desc": "a", "bbox_2d": [0, 0, 641, 10]}]), "objects[0].bbox_2d", "box_outside_image"),
    (_row([{"desc": "a", "bbox_2d": [-1, 0, 5, 10]}]), "objects[0].bbox_2d", "box_outside_image"),
    (_row([{"desc": "a", "bbox_2d": [0, 0, 5]}]), "objects[0].bbox_2d", "bad_bbox_arity"),
    (_row([{"desc": "a", "bbox_2d": [0, 0, 5, "7"]}]), "objects[0].bbox_2d", "bad_bbox_value"),
    (_row([], image="nope.png"), "image", "missing_image"),
    ({"image": "a.png", "height": 4, "objects": []}, "width", "missing_field"),
    (_row([], width=0), "width", "bad_size"),
    (_row([], height=-3), "height", "bad_size"),
    ("[1, 2]", "<line>", "not_object"),
    (_row([{"desc": "cat <|im_end|>", "bbox_2d": [0, 0, 1, 1]}]), "objects[0].desc", "special_token_in_desc"),
    ('{"image": "a.png", "width": 0, "height": 4, "objects": [], "width": 64}', "width", "duplicate_key"),
    ('{"image": "a.png", "width": 8, "height": 4, "objects": [{"desc": "a", "desc": "b", "bbox_2d": [0, 0, 1, 1]}]}',
     "desc", "duplicate_key"),
    ('{"image": "a.png", "width": 8, "height": 4, "objects": [{"desc": "cat \\ud800", "bbox_2d": [0, 0, 1, 1]}]}',
     "objects[0].desc", "bad_desc"),
    (_row([{"desc": "a", "bbox_2d": [0, 0, 1, 1], "poly": [0, 0, 1, 0, 1, 1]}]), "objects[0].poly", "unsupported_geometry"),
    (_row([{"desc": "a", "poly": [0, 0, 1, 0, 1, 1]}]), "objects[0].poly", "unsupported_geometry"),
    (_row([{"desc": "a", "bbox_2d": [0, 0, 1, 1], "colour": "red"}]), "objects[0].colour", "unknown_key"),
    (_row([], widht=3), "widht", "unknown_key"),
    (_row([{"desc": "a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", 4]}]), "objects[0].bbox_2d", "bad_bbox_value"),
    (_row([{"desc": "a", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_1000|>"]}]),
     "objects[0].bbox_2d", "bad_bbox_value"),
    (_row([{"desc": "a", "bbox_2d": ["<|coord_5|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}]),
     "objects[0].bbox_2d", "inverted_box"),
]


@pytest.mark.parametrize("line,field,reason", BAD_LINES)
def test_each_error_names_file_line_field(tmp, line, field, reason):
    good = _row([{"desc": "ok", "bbox_2d": [0, 0, 1, 1]}], image="b.png")
    path = write_jsonl(str(tmp / "d.jsonl"), [good, line])
    with pytest.raises(DataError) as ei:
        read_jsonl(path)
    e = ei.value
    assert (e.source, e.field, e.reason) == (f"{path}:2", field, reason)
    assert f"{path}:2" in str(e) and repr(field) in str(e)


def test_skip_invalid_counts_each_reason(tmp):
    good = _row([{"desc": "ok", "bbox_2d": [0, 0, 1, 1]}])
    rows = [good] + [line for line, _, _ in BAD_LINES] + [_row([], image="b.png"), _row([], image="b.png")]
    recs, rep = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), rows), skip_invalid=True)
    assert len(recs) == 2 and rep.records == 2
    expected = {}
    for _, _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    expected["duplicate_image_id"] = 1  # second b.png line
    assert dict(rep.skipped) == expected
    assert rep.skipped_total == len(BAD_LINES) + 1
    assert "skipped" in rep.summary() and "not_json=1" in rep.summary()


def test_missing_image_ignored_when_check_images_false(tmp):
    recs, _ = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), [_row([], image="nope.png")]), check_images=False)
    assert recs[0].image_path.endswith("nope.png")


def test_max_objects_truncates_after_ordering_and_counts(tmp):
    objs = [{"desc": f"o{i}", "bbox_2d": [0, 100 - 10 * i, 5, 100]} for i in range(5)]
    recs, rep = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), [_row(objs)]), max_objects=2)
    # smallest y1 first: o4 (y1=60), o3 (y1=70)
    assert [o.desc for o in recs[0].objects] == ["o4", "o3"]
    assert (rep.truncated_records, rep.truncated_objects, rep.objects) == (1, 3, 2)


def test_bad_options_name_allowed_values(tmp):
    path = write_jsonl(str(tmp / "d.jsonl"), [])
    with pytest.raises(ValueError, match="pixel, bins"):
        read_jsonl(path, coords="fraction")
    with pytest.raises(ValueError, match="yx, none"):
        read_jsonl(path, object_order="xy")


def test_desc_is_nfc_normalised(tmp):
    objs = [{"desc": "cafe\u0301", "bbox_2d": [0, 0, 5, 5]}]
    recs, _ = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), [_row(objs)]))
    assert recs[0].objects[0].desc == "caf\u00e9"


def _write_bytes(path, lines: list[bytes]) -> str:
    with open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    return str(path)


def test_non_utf8_line_names_file_line_and_is_skippable(tmp):
    import json

    good = json.dumps(_row([{"desc": "ok", "bbox_2d": [0, 0, 1, 1]}])).encode()
    bad = b'{"image": "b.png", "width": 8, "height": 8, "objects": [{"desc": "caf\xe9", "bbox_2d": [0, 0, 1, 1]}]}'
    path = _write_bytes(tmp / "d.jsonl", [good, bad])
    with pytest.raises(DataError) as ei:
        read_jsonl(path)
    assert (ei.value.source, ei.value.field, ei.value.reason) == (f"{path}:2", "<line>", "not_utf8")
    assert f"{path}:2" in str(ei.value) and "0xe9" in str(ei.value) and "UTF-8" in str(ei.value)
    recs, rep = read_jsonl(path, skip_invalid=True)
    assert len(recs) == 1 and dict(rep.skipped) == {"not_utf8": 1} and rep.lines == 2


def test_crlf_and_utf8_descs_still_read(tmp):
    import json

    row = json.dumps(_row([{"desc": "café ☕", "bbox_2d": [0, 0, 1, 1]}]), ensure_ascii=False).encode()
    path = _write_bytes(tmp / "d.jsonl", [row + b"\r", b"\r"])
    recs, rep = read_jsonl(path)
    assert recs[0].objects[0].desc == "café ☕" and rep.blank_lines == 1 and rep.lines == 1


def test_poly_message_says_polygons_are_not_supported(tmp):
    path = write_jsonl(str(tmp / "d.jsonl"), [_row([{"desc": "a", "bbox_2d": [0, 0, 1, 1], "poly": [0, 0, 1, 1]}])])
    with pytest.raises(DataError, match="not supported") as ei:
        read_jsonl(path)
    assert "bbox_2d" in str(ei.value) and "remove 'poly'" in str(ei.value)


def test_unknown_key_suggests_and_lists_allowed(tmp):
    path = write_jsonl(str(tmp / "d.jsonl"), [_row([], image_idd="x")])
    with pytest.raises(DataError, match="did you mean 'image_id'") as ei:
        read_jsonl(path)
    assert "image, width, height, objects, image_id" in str(ei.value)


@pytest.mark.parametrize("coords", ["pixel", "bins"])
def test_coord_token_boxes_are_bins_in_either_mode(tmp, coords):
    objs = [
        {"desc": "tok", "bbox_2d": ["<|coord_10|>", "<|coord_20|>", "<|coord_999|>", "<|coord_30|>"]},
        {"desc": "zero", "bbox_2d": ["<|coord_0|>", "<|coord_0|>", "<|coord_0|>", "<|coord_0|>"]},
    ]
    recs, _ = read_jsonl(write_jsonl(str(tmp / "d.jsonl"), [_row(objs)]), coords=coords)
    assert [(o.desc, o.bins) for o in recs[0].objects] == [("zero", (0, 0, 0, 0)), ("tok", (10, 20, 999, 30))]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_file_is_an_error_naming_the_file(tmp, content):
    path = tmp / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    for skip in (False, True):
        with pytest.raises(DataError) as ei:
            read_jsonl(str(path), skip_invalid=skip)
        assert ei.value.reason == "empty_file" and str(path) in str(ei.value) and "no records" in str(ei.value)
        assert "skip_invalid" not in str(ei.value)  # skipping cannot fix an empty file


def test_a_missing_image_points_at_data_image_root_first(tmp):
    (tmp / "coco" / "train2017").mkdir(parents=True)
    write_png(str(tmp / "coco" / "train2017" / "a.png"), 640, 480)
    path = write_jsonl(str(tmp / "train2017.jsonl"), [_row([], image="train2017/a.png", image_id=1),
                                                       _row([], image="train2017/b.png", image_id=2)])
    wrong = tmp / "coco" / "train2017"  # one level too deep: the COCO root is right
    with pytest.raises(DataError) as ei:
        read_jsonl(path, image_root=str(wrong))
    msg = str(ei.value)
    assert ei.value.reason == "missing_image" and "\n" not in msg
    assert f"Check data.image_root first (now {str(wrong)!r}; for COCO, the folder holding train2017/" in msg
    assert msg.index("data.image_root first") < msg.index("set data.skip_invalid: true")
    # skip_invalid already on and every line skipped: what the trainers check on each split (require_records)
    # names the image root again, and gives no skip_invalid advice
    recs, report = read_jsonl(path, image_root=str(wrong), skip_invalid=True)
    assert recs == [] and report.skipped == {"missing_image": 2}
    with pytest.raises(DataError) as ei:
        require_records(report, str(wrong))
    msg = str(ei.value)
    assert ei.value.reason == "no_records" and "skipped all 2 lines (missing_image=2)" in msg
    assert "Check data.image_root first" in msg and "set data.skip_invalid" not in msg
    # without data.image_root the JSONL's folder is named
    with pytest.raises(DataError, match=r"data.image_root first \(not set: paths are relative to the JSONL's folder"):
        read_jsonl(write_jsonl(str(tmp / "sub.jsonl"), [_row([], image="nope.png")]))
    recs, report = read_jsonl(path, image_root=str(tmp / "coco"), skip_invalid=True)
    assert [r.image_id for r in recs] == ["1"]
    require_records(report, str(tmp / "coco"))  # one record left: fine
