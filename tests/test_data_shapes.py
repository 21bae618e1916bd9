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
