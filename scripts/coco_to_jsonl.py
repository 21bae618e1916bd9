"""Convert a COCO instances JSON to the CoordExp JSONL record contract (pixel boxes).

    python scripts/coco_to_jsonl.py --coco annotations/instances_val2017.json \
        --out data/coco_val.jsonl [--image-prefix val2017] [--limit 500]

desc = category name; COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image (COCO boxes
overshoot the border by a fraction of a pixel now and then; the reader allows no tolerance).
``iscrowd`` annotations are skipped and counted; images without annotations are kept with
``"objects": []``. ``image`` is ``image_prefix/file_name`` (relative to the JSONL unless the
reader is given ``image_root``); ``image_id`` is the COCO id. A report is printed and returned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict


def convert(
    coco: dict, *, image_prefix: str = "", limit: int | None = None, source: str = "<coco>"
) -> tuple[list, Counter]:
    """COCO dict -> (JSONL rows in COCO image order, report counters)."""
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{source}: not a COCO instances file: top-level key {key!r} missing")
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
            raise ValueError(f"{source}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
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
    for im in coco["images"]:
        if limit is not None and len(rows) >= limit:
            report["images_beyond_limit"] += 1
            continue
        objs = by_image.get(im["id"], [])
        report["images"] += 1
        report["objects"] += len(objs)
        report["images_without_objects"] += int(not objs)
        image = os.path.join(image_prefix, im["file_name"]) if image_prefix else im["file_name"]
        rows.append(
            {"image": image, "width": im["width"], "height": im["height"], "image_id": im["id"], "objects": objs}
        )
    return rows, report


def main(argv: list[str] | None = None) -> Counter:
    ap = argparse.ArgumentParser(description="COCO instances JSON -> CoordExp JSONL")
    ap.add_argument("--coco", required=True, help="COCO instances JSON")
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to each file_name, e.g. 'val2017'")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N images")
    args = ap.parse_args(argv)
    with open(args.coco, encoding="utf-8") as fh:
        coco = json.load(fh)
    rows, report = convert(coco, image_prefix=args.image_prefix, limit=args.limit, source=args.coco)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(report.items())), file=sys.stdout)
    return report


if __name__ == "__main__":
    main()
