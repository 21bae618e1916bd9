"""Draw GT (green) and predicted (red) boxes from a predictions.jsonl into PNG grid pages.

    python -m eval.visualize --predictions runs/x/eval/step_100/predictions.jsonl --out-dir viz/ [--images-per-page 4]

Each record's ``image`` path is opened (relative paths resolve against ``--image-root``,
default: the folder of the predictions file). Boxes are scaled from the record's
``width``/``height`` to the opened image, so a resized copy of the image still lines up.
Each cell has a header with the record's ``image_id``, its GT / prediction counts and a legend (GT
green, prediction red). Boxes are two-tone: the coloured stroke between two dark outlines, so a green
GT box stays visible on a green object. Labels (GT
``desc``; predictions ``desc score``) sit next to their box and never across a box outline or on
another label. Pages are ``page_000.png``, ``page_001.png`` ...
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from configs.errors import InputError, add_debug_flag, run_cli
from data.records import bins_to_pixels
from eval.detection import read_predictions_jsonl

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 0, 0)
OUTLINE_COLOR = (20, 20, 20)  # the dark edge on both sides of every coloured box stroke
LINE_WIDTH = 3  # the coloured stroke, drawn inward from the box edge
OUTLINE = 1  # dark pixels outside and inside the stroke
LEGEND = (("GT", GT_COLOR), ("prediction (desc score)", PRED_COLOR))


def _boxes(record: Mapping[str, Any], key: str) -> list[tuple[str, tuple[float, ...], float | None]]:
    out = []
    for o in record.get(key) or []:
        box = tuple(float(v) for v in o["bbox_2d"])
        if record.get("coords", "pixel") == "bins":
            box = bins_to_pixels(box, record["width"], record["height"])
        out.append((str(o["desc"]), box, o.get("score")))
    return out


MARGIN = 16  # white border around the image: labels of boxes at the image edge go there
HEADER_H = 30  # strip above the image: the record's image id and box counts, then the legend

Rect = tuple[float, float, float, float]


def _intersects(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses_outline(label: Rect, box: Rect, width: float) -> bool:
    """True when ``label`` touches the drawn outline of ``box`` (inside the box's interior is fine)."""
    outer = (box[0] - width, box[1] - width, box[2] + width, box[3] + width)
    inner = (box[0] + width, box[1] + width, box[2] - width, box[3] - width)
    inside = inner[0] <= label[0] and label[2] <= inner[2] and inner[1] <= label[1] and label[3] <= inner[3]
    return _intersects(label, outer) and not inside


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[float, float]], canvas: tuple[int, int],
                 line_width: float = LINE_WIDTH) -> list[Rect]:
    """A rectangle for each box's label (``sizes[i]`` = text width, height) that crosses no box outline,
    overlaps no other label and stays on the ``canvas`` (width, height).

    Tried in order: above the box's top-left corner, below its bottom-left, inside its top-left,
    above its top-right, below its bottom-right; failing those, the free spot nearest the box's
    top-left corner on a 4-pixel grid. Only when the canvas has no free spot at all is the first
    candidate used as is.
    """
    placed: list[Rect] = []
    cw, ch = canvas
    gap = line_width + 1

    def free(r: Rect) -> bool:
        return (r[0] >= 0 and r[1] >= 0 and r[2] <= cw and r[3] <= ch
                and not any(_crosses_outline(r, b, line_width) for b in boxes)
                and not any(_intersects(r, q) for q in placed))

    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        candidates = [(x1, y1 - gap - h), (x1, y2 + gap), (x1 + gap, y1 + gap), (x2 - w, y1 - gap - h), (x2 - w, y2 + gap)]
        rects = [(x, y, x + w, y + h) for x, y in candidates]
        choice = next((r for r in rects if free(r)), None)
        if choice is None:
            spots = sorted(((x, y) for y in range(0, max(1, int(ch - h) + 1), 4) for x in range(0, max(1, int(cw - w) + 1), 4)),
                           key=lambda p: (p[0] - x1) ** 2 + (p[1] - y1) ** 2)
            choice = next((r for r in ((x, y, x + w, y + h) for x, y in spots) if free(r)), rects[0])
        placed.append(choice)
    return placed


def draw_box(draw, xy: Rect, color: tuple[int, int, int]) -> None:
    """A two-tone box: the ``color`` stroke (``LINE_WIDTH``, inward from ``xy``) between dark outlines
    (``OUTLINE`` pixels outside the box edge and inside the stroke), visible on any background."""
    x1, y1, x2, y2 = xy
    draw.rectangle((x1 - OUTLINE, y1 - OUTLINE, x2 + OUTLINE, y2 + OUTLINE), outline=OUTLINE_COLOR,
                   width=LINE_WIDTH + 2 * OUTLINE)
    draw.rectangle(xy, outline=color, width=LINE_WIDTH)


def render_record(record: Mapping[str, Any], image_root: Path, cell_size: int = 512, blank_missing: bool = False):
    """One PIL image of at most ``cell_size`` x ``cell_size``: a header with the record's ``image_id``
    (and GT / prediction counts), then the image with its GT and predicted boxes and their labels.

    Labels are placed by :func:`place_labels`: never across a box outline, never on each other.
    """
    from PIL import Image, ImageDraw

    from data.images import to_rgb

    w, h = float(record["width"]), float(record["height"])
    path = record.get("image")
    if path is not None and (image_root / path).is_file():
        with Image.open(image_root / path) as im:
            img = to_rgb(im)  # the image the model saw (16-bit scaled, alpha over white)
    elif blank_missing:
        img = Image.new("RGB", (max(1, round(w)), max(1, round(h))), (128, 128, 128))
    else:
        where = record.get("_where", f"image_id={record.get('image_id')!r}")
        raise FileNotFoundError(
            f"{where}: image {path!r} not found under {image_root}; pass --image-root DIR, "
            "or --blank-missing to draw on a grey canvas"
        )
    room_w, room_h = max(1, cell_size - 2 * MARGIN), max(1, cell_size - 2 * MARGIN - HEADER_H)
    scale = min(room_w / img.width, room_h / img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    ox, oy = MARGIN, MARGIN + HEADER_H
    cell = Image.new("RGB", (img.width + 2 * MARGIN, img.height + 2 * MARGIN + HEADER_H), (255, 255, 255))
    cell.paste(img, (ox, oy))
    sx, sy = img.width / w, img.height / h
    draw = ImageDraw.Draw(cell)
    drawn = [(key, color, desc, score, (ox + min(x1, x2) * sx, oy + min(y1, y2) * sy,
                                        ox + max(x1, x2) * sx, oy + max(y1, y2) * sy))
             for key, color in (("gt", GT_COLOR), ("pred", PRED_COLOR))
             for desc, (x1, y1, x2, y2), score in _boxes(record, key)]
    n_gt = sum(1 for d in drawn if d[0] == "gt")
    draw.text((MARGIN, 2), f"{record.get('image_id')}  gt {n_gt}  pred {len(drawn) - n_gt}", fill=(0, 0, 0))
    x = MARGIN
    for text, color in LEGEND:  # a short two-tone stroke in each colour, then its name
        draw_box(draw, (x, 19, x + 16, 25), color)
        draw.text((x + 20, 16), text, fill=color)
        left, _, right, _ = draw.textbbox((0, 0), text)
        x += 20 + right - left + 12
    for _, color, _, _, xy in drawn:
        draw_box(draw, xy, color)
    labels = [desc if score is None else f"{desc} {float(score):.2f}" for _, _, desc, score, _ in drawn]
    sizes = []
    for text in labels:
        left, top, right, bottom = draw.textbbox((0, 0), text)
        sizes.append((right - left + 2, bottom - top + 2))
    rects = place_labels([d[4] for d in drawn], sizes, cell.size, line_width=LINE_WIDTH + OUTLINE)
    for (_, color, _, _, _), text, rect in zip(drawn, labels, rects):
        draw.rectangle(rect, fill=(255, 255, 255))
        left, top, _, _ = draw.textbbox((0, 0), text)
        draw.text((rect[0] + 1 - left, rect[1] + 1 - top), text, fill=color)
    cell.info["label_rects"] = rects  # for tests: where each label went
    cell.info["box_rects"] = [d[4] for d in drawn]
    return cell


def render_pages(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    image_root: str | Path,
    images_per_page: int = 4,
    cell_size: int = 512,
    blank_missing: bool = False,
) -> list[Path]:
    """Write grid pages of ``images_per_page`` cells; returns the PNG paths in order."""
    from PIL import Image

    if images_per_page < 1:
        raise InputError(f"--images-per-page must be >= 1, got {images_per_page}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = math.ceil(math.sqrt(images_per_page))
    rows = math.ceil(images_per_page / cols)
    paths = []
    for page, start in enumerate(range(0, len(records), images_per_page)):
        chunk = records[start : start + images_per_page]
        canvas = Image.new("RGB", (cols * cell_size, rows * cell_size), (255, 255, 255))
        for i, rec in enumerate(chunk):
            cell = render_record(rec, Path(image_root), cell_size, blank_missing)
            canvas.paste(cell, ((i % cols) * cell_size, (i // cols) * cell_size))
        path = out_dir / f"page_{page:03d}.png"
        canvas.save(path)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.visualize", description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--images-per-page", type=int, default=4)
    p.add_argument("--image-root", default=None, help="base of relative image paths (default: the predictions folder)")
    p.add_argument("--cell-size", type=int, default=512, help="longest side of each image cell in pixels")
    p.add_argument("--limit", type=int, default=None, help="draw only the first N records")
    p.add_argument("--blank-missing", action="store_true", help="grey canvas for records whose image is missing")
    return add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    records = read_predictions_jsonl(args.predictions)
    for lineno, rec in enumerate(records, start=1):
        rec["_where"] = f"{args.predictions}: record {lineno}"
    if args.limit is not None:
        records = records[: args.limit]
    root = Path(args.image_root) if args.image_root else Path(args.predictions).resolve().parent
    paths = render_pages(
        records, args.out_dir, image_root=root, images_per_page=args.images_per_page,
        cell_size=args.cell_size, blank_missing=args.blank_missing,
    )  # fmt: skip
    print(f"wrote {len(paths)} page(s) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
