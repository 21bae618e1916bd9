"""Convert a COCO instances JSON to the CoordExp JSONL record contract (pixel boxes).

    python scripts/coco_to_jsonl.py --coco annotations/instances_val2017.json \
        --out data/coco_val.jsonl [--image-prefix val2017] [--limit 500]

desc = category name; COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image (COCO boxes
overshoot the border by a fraction of a pixel now and then; the reader allows no tolerance).
``iscrowd`` annotations are skipped and counted; images without annotations are kept with
``"objects": []``. ``image`` is ``image_prefix/file_name`` (relative to the JSONL unless the
reader is given ``image_root``); ``image_id`` is the COCO id. A report is printed and returned.

LVIS (``--format lvis``, or detected by ``--format auto``): the same COCO layout, but no
``iscrowd``, images carry ``coco_url`` instead of ``file_name`` (the file name is the URL's last
path component) and per-image ``not_exhaustive_category_ids`` / ``neg_category_ids``. Both lists
are kept in each record (metadata keys the record contract allows and does not read) as sorted category
names, ``not_exhaustive_descs`` and ``neg_descs``, the desc vocabulary of the JSONL; their
totals are counted in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.errors import InputError, add_debug_flag, run_cli  # noqa: E402

FORMATS = ("auto", "coco", "lvis")
# Per-image LVIS lists: source key -> record key (category names, like desc).
LVIS_IMAGE_LISTS = {"not_exhaustive_category_ids": "not_exhaustive_descs", "neg_category_ids": "neg_descs"}


def detect_format(coco: dict) -> str:
    """``"lvis"`` when any image has an LVIS per-image list or a ``coco_url`` without ``file_name``."""
    for im in coco.get("images", []):
        if any(k in im for k in LVIS_IMAGE_LISTS) or ("file_name" not in im and "coco_url" in im):
            return "lvis"
    return "coco"


def _file_name(im: dict, fmt: str, source: str) -> str:
    if fmt == "lvis" and "coco_url" in im:
        # LVIS v1: "http://images.cocodataset.org/train2017/000000391895.jpg" -> "000000391895.jpg"
        name = im["coco_url"].rstrip("/").rsplit("/", 1)[-1]
        if name:
            return name
    if "file_name" in im:
        return im["file_name"]
    raise InputError(
        f"{source}: image {im.get('id')} has no file_name"
        + (" and no usable coco_url" if fmt == "lvis" else " (an LVIS file? pass --format lvis)")
    )


def convert(
    coco: dict,
    *,
    image_prefix: str = "",
    limit: int | None = None,
    source: str = "<coco>",
    fmt: str = "auto",
) -> tuple[list, Counter]:
    """COCO/LVIS dict -> (JSONL rows in image order, report counters). ``fmt``: auto | coco | lvis."""
    if fmt not in FORMATS:
        raise InputError(f"--format={fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise InputError(f"{source}: not a COCO instances file: top-level key {key!r} missing")
    if fmt == "auto":
        fmt = detect_format(coco)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    report: Counter = Counter()
    by_image: dict = defaultdict(list)
    images = {im["id"]: im for im in coco["images"]}
    for a in coco["annotations"]:
        report["annotations"] += 1
        if a.get("iscrowd", 0):
            report["skipped_iscrowd"] += 1
            continue
        if a["image_id"] not in images:
            report["skipped_unknown_image"] += 1
            continue
        if a["category_id"] not in names:
            raise InputError(f"{source}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        im = images[a["image_id"]]
        x, y, w, h = (float(v) for v in a["bbox"])
        W, H = im["width"], im["height"]
        x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
        x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            report["clipped_boxes"] += 1
        if x2 <= x1 or y2 <= y1:
            report["skipped_empty_box"] += 1
            continue
        by_image[a["image_id"]].append({"desc": names[a["category_id"]], "bbox_2d": [x1, y1, x2, y2]})
    rows = []
    report[f"format_{fmt}"] = 1
    for im in coco["images"]:
        if limit is not None and len(rows) >= limit:
            report["images_beyond_limit"] += 1
            continue
        objs = by_image.get(im["id"], [])
        report["images"] += 1
        report["objects"] += len(objs)
        report["images_without_objects"] += int(not objs)
        file_name = _file_name(im, fmt, source)
        image = os.path.join(image_prefix, file_name) if image_prefix else file_name
        row = {"image": image, "width": im["width"], "height": im["height"], "image_id": im["id"], "objects": objs}
        if fmt == "lvis":
            for src_key, out_key in LVIS_IMAGE_LISTS.items():
                ids = im.get(src_key, [])
                unknown = [c for c in ids if c not in names]
                if unknown:
                    raise InputError(f"{source}: image {im['id']}: {src_key} has unknown category ids {unknown}")
                row[out_key] = sorted({names[c] for c in ids})
                report[out_key] += len(row[out_key])
                report[f"images_with_{out_key}"] += int(bool(ids))
        rows.append(row)
    return rows, report


def main(argv: list[str] | None = None) -> Counter:
    ap = argparse.ArgumentParser(description="COCO / LVIS instances JSON -> CoordExp JSONL")
    ap.add_argument("--coco", required=True, help="COCO or LVIS instances JSON")
    ap.add_argument(
        "--format", choices=FORMATS, default="auto", help="auto: LVIS when images carry LVIS keys / coco_url only"
    )
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to each file_name, e.g. 'val2017'")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N images")
    args = add_debug_flag(ap).parse_args(argv)
    with open(args.coco, encoding="utf-8") as fh:
        coco = json.load(fh)
    rows, report = convert(coco, image_prefix=args.image_prefix, limit=args.limit, source=args.coco, fmt=args.format)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(report.items())), file=sys.stdout)
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
