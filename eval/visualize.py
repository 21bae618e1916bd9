"""Draw GT (green) and predicted (red) boxes from a predictions.jsonl into PNG grid pages.

    python -m eval.visualize --predictions runs/x/eval/step_100/predictions.jsonl --out-dir viz/ [--images-per-page 4]

Each record's ``image`` path is opened (relative paths resolve against ``--image-root``,
default: the folder of the predictions file). Boxes are scaled from the record's
``width``/``height`` to the opened image, so a resized copy of the image still lines up.
Labels: GT ``desc``; predictions ``desc score``. Pages are ``page_000.png``, ``page_001.png`` ...
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from configs.errors import add_debug_flag, run_cli
from eval.detection import bins_to_pixels, read_predictions_jsonl

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 0, 0)
LINE_WIDTH = 3


def _boxes(record: Mapping[str, Any], key: str) -> list[tuple[str, tuple[float, ...], float | None]]:
    out = []
    for o in record.get(key) or []:
        box = tuple(float(v) for v in o["bbox_2d"])
        if record.get("coords", "pixel") == "bins":
            box = bins_to_pixels(box, record["width"], record["height"])
        out.append((str(o["desc"]), box, o.get("score")))
    return out


def render_record(record: Mapping[str, Any], image_root: Path, cell_size: int = 512, blank_missing: bool = False):
    """One PIL image (longest side ``cell_size``) with the record's GT and predicted boxes drawn."""
    from PIL import Image, ImageDraw

    w, h = float(record["width"]), float(record["height"])
    path = record.get("image")
    if path is not None and (image_root / path).is_file():
        img = Image.open(image_root / path).convert("RGB")
    elif blank_missing:
        img = Image.new("RGB", (max(1, round(w)), max(1, round(h))), (128, 128, 128))
    else:
        where = record.get("_where", f"image_id={record.get('image_id')!r}")
        raise FileNotFoundError(
            f"{where}: image {path!r} not found under {image_root}; pass --image-root DIR, "
            "or --blank-missing to draw on a grey canvas"
        )
    scale = cell_size / max(img.width, img.height)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    sx, sy = img.width / w, img.height / h
    draw = ImageDraw.Draw(img)
    for key, color in (("gt", GT_COLOR), ("pred", PRED_COLOR)):
        for desc, (x1, y1, x2, y2), score in _boxes(record, key):
            xy = [min(x1, x2) * sx, min(y1, y2) * sy, max(x1, x2) * sx, max(y1, y2) * sy]
            draw.rectangle(xy, outline=color, width=LINE_WIDTH)
            label = desc if score is None else f"{desc} {float(score):.2f}"
            # GT labels above the box's top-left corner, predictions inside it, so they rarely overlap.
            ty = xy[1] - 11 if key == "gt" else xy[1] + LINE_WIDTH
            draw.text((xy[0] + LINE_WIDTH, max(0.0, ty)), label, fill=color)
    return img


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
        raise ValueError(f"--images-per-page must be >= 1, got {images_per_page}")
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
