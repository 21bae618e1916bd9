"""Synthetic shapes dataset: deterministic, idempotent, valid under the JSONL contract."""

from __future__ import annotations

import json
import os

from PIL import Image

from data.records import read_jsonl
from data.shapes import COLORS, make_shapes_dataset
from scripts.make_shapes import main as make_shapes_main


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_deterministic_valid_and_boxes_match_pixels(tmp_path):
    a_train, a_val = make_shapes_dataset(tmp_path / "a", 6, 3, image_size=48, max_shapes=3, seed=1)
    b_train, _ = make_shapes_dataset(tmp_path / "b", 6, 3, image_size=48, max_shapes=3, seed=1)
    assert _lines(a_train) == _lines(b_train)
    with (
        open(os.path.join(tmp_path, "a", "images", "train", "000002.png"), "rb") as fa,
        open(os.path.join(tmp_path, "b", "images", "train", "000002.png"), "rb") as fb,
    ):
        assert fa.read() == fb.read()
    c_train, _ = make_shapes_dataset(tmp_path / "c", 6, 3, image_size=48, max_shapes=3, seed=2)
    assert _lines(c_train) != _lines(a_train)
    assert _lines(a_val) != _lines(a_train)[:3]  # val uses its own stream

    recs, rep = read_jsonl(a_train)
    assert rep.records == 6 and not rep.skipped and all(1 <= len(r.objects) <= 3 for r in recs)
    for row in _lines(a_train):
        img = Image.open(os.path.join(tmp_path, "a", row["image"])).convert("RGB")
        assert img.size == (48, 48) == (row["width"], row["height"])
        last = row["objects"][-1]  # drawn last, so nothing covers it
        color, shape = last["desc"].split()
        x1, y1, x2, y2 = last["bbox_2d"]
        # a point inside every shape kind: horizontal centre, 2/3 down the box
        assert img.getpixel(((x1 + x2) // 2, y1 + 2 * (y2 - y1) // 3)) == COLORS[color]
        if shape == "square":
            assert img.getpixel((x1, y1)) == COLORS[color] and img.getpixel((x2 - 1, y2 - 1)) == COLORS[color]


def test_idempotent_and_regenerates_on_new_params(tmp_path):
    train, _ = make_shapes_dataset(tmp_path, 3, 1)
    mtime = os.stat(train).st_mtime_ns
    assert make_shapes_dataset(tmp_path, 3, 1) == (train, os.path.join(tmp_path, "val.jsonl"))
    assert os.stat(train).st_mtime_ns == mtime
    make_shapes_dataset(tmp_path, 4, 1)
    assert len(_lines(train)) == 4


def test_cli(tmp_path, capsys):
    train, val = make_shapes_main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "3"])
    assert len(_lines(train)) == 2 and len(_lines(val)) == 1 and "train:" in capsys.readouterr().out


def test_supersample_gives_fractional_boxes_on_every_bin_and_area_averaged_edges(tmp_path):
    from data.records import pixel_to_bin
    from data.shapes import BACKGROUND

    # 1/8-pixel edges on a 128-px side reach every one of the 1000 bins; integer edges reach 129
    assert {pixel_to_bin(k / 8, 128) for k in range(8 * 128 + 1)} == set(range(1000))
    assert len({pixel_to_bin(k, 128) for k in range(129)}) == 129
    train, _ = make_shapes_dataset(tmp_path, 40, 0, image_size=128, max_shapes=1, seed=4, supersample=8)
    rows = _lines(train)
    edges = [v for row in rows for o in row["objects"] for v in o["bbox_2d"]]
    assert all((8 * v) == int(8 * v) for v in edges) and any(v != int(v) for v in edges)
    checked = 0
    for row in rows:
        (obj,) = row["objects"]
        color, shape = obj["desc"].split()
        x1, y1, x2, y2 = obj["bbox_2d"]
        if shape != "square" or x1 == int(x1):
            continue
        img = Image.open(os.path.join(tmp_path, row["image"])).convert("RGB")
        assert img.size == (128, 128)
        covered = 1 - (x1 - int(x1))  # fraction of pixel column int(x1) the square covers
        got = img.getpixel((int(x1), int((y1 + y2) / 2)))
        want = [covered * c + (1 - covered) * b for c, b in zip(COLORS[color], BACKGROUND)]
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)
        assert img.getpixel((int(x1) + 1, int((y1 + y2) / 2))) == COLORS[color]
        checked += 1
    assert checked >= 2
