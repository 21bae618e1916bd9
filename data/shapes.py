"""Synthetic "shapes" detection data: small PNGs with coloured squares, circles and triangles.

Deterministic from ``seed`` (train and val use disjoint sub-seeds), written as the JSONL record
contract with pixel boxes, so the demo exercises the same reader as real data. Each shape's box
is exactly the extent it is drawn in (``[x1, y1, x2, y2]`` pixels, x2/y2 exclusive edges).

``supersample=S`` draws each image at S times its side and area-averages it down, so box edges
fall on 1/S-pixel positions (fractional pixel boxes, anti-aliased edges). Without it a 128-px image
has only 129 distinct edge positions, i.e. 129 of the 1000 coord bins ever occur in the answers
and the other 871 coord tokens are never seen as inputs in training; a model that then writes one
of them (a smooth coord distribution's argmax can land there) continues from an untrained
embedding. ``S >= ceil(1000 / image_size)`` makes every bin occur.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (245, 245, 245)
_PARAMS_FILE = "shapes_params.json"


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    # PIL's rectangle/ellipse include their end pixel, so draw to x2-1 / y2-1 for exclusive edges.
    if shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    elif shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=color)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=color)


def _make_image(rng: random.Random, image_size: int, max_shapes: int,
                supersample: int = 1) -> tuple[Image.Image, list[dict]]:
    big = image_size * supersample  # drawn at this side, then area-averaged to image_size
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    objects = []
    lo = max(4, image_size // 8) * supersample
    hi = max(lo + supersample, image_size // 2 * supersample)
    for _ in range(rng.randint(1, max_shapes)):
        side = rng.randint(lo, hi)
        x1 = rng.randint(0, big - side)
        y1 = rng.randint(0, big - side)
        shape = rng.choice(SHAPES)
        color = rng.choice(sorted(COLORS))
        box = (x1, y1, x1 + side, y1 + side)
        _draw(draw, shape, box, COLORS[color])
        bbox = list(box) if supersample == 1 else [v / supersample for v in box]
        objects.append({"desc": f"{color} {shape}", "bbox_2d": bbox})
    if supersample > 1:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return img, objects


def _write_split(out_dir: str, split: str, n: int, seed: int, image_size: int, max_shapes: int,
                 supersample: int) -> str:
    img_dir = os.path.join(out_dir, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    rng = random.Random(f"shapes/{seed}/{split}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for i in range(n):
            img, objects = _make_image(rng, image_size, max_shapes, supersample)
            rel = f"images/{split}/{i:06d}.png"
            img.save(os.path.join(out_dir, rel))
            row = {"image": rel, "width": image_size, "height": image_size, "objects": objects}
            row["image_id"] = f"{split}_{i:06d}"
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)  # the JSONL appears only once every image exists
    return path


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    image_size: int = 64,
    max_shapes: int = 3,
    seed: int = 0,
    supersample: int = 1,
) -> tuple[str, str]:
    """Write ``out_dir/{train,val}.jsonl`` + ``out_dir/images/``; return the two JSONL paths.

    Idempotent: when ``out_dir`` already holds a dataset made with the same parameters it is
    reused as is; different parameters regenerate it.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train/num_val must be >= 0, got {num_train}/{num_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "max_shapes": max_shapes,
        "seed": seed,
        "supersample": supersample,
        "version": 1,
    }
    train, val = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "val.jsonl")
    pfile = os.path.join(out_dir, _PARAMS_FILE)
    if os.path.isfile(pfile) and os.path.isfile(train) and os.path.isfile(val):
        with open(pfile, encoding="utf-8") as fh:
            if json.load(fh) == params:
                return train, val
    if os.path.isfile(pfile):
        os.remove(pfile)  # a crash below must not leave stale params claiming a finished dataset
    _write_split(out_dir, "train", num_train, seed, image_size, max_shapes, supersample)
    _write_split(out_dir, "val", num_val, seed, image_size, max_shapes, supersample)
    with open(pfile, "w", encoding="utf-8") as fh:
        json.dump(params, fh, sort_keys=True)
    return train, val
