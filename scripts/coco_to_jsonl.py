"""Convert a COCO, LVIS or Objects365 instances JSON to the CoordExp JSONL record contract (pixel boxes).

    python scripts/coco_to_jsonl.py --coco /data/coco/annotations/instances_val2017.json \
        --out /data/coco/val2017.jsonl --image-prefix val2017 [--limit 500] [--skip-invalid]

desc = category name; ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image (COCO boxes
overshoot the border by a fraction of a pixel now and then; the reader allows no tolerance), counted
as ``clipped_boxes``. A box with zero width or height inside the image is kept (the object is there;
dropping it would make its image a false "no objects" example) and counted as ``zero_area_boxes``.
``iscrowd`` annotations are skipped and counted. A malformed annotation (``bbox`` not 4 finite
numbers, negative width/height, a box entirely outside its image, an unknown image or category id)
is an error naming the annotation id, or with ``--skip-invalid`` skipped and counted per reason
(``skipped_<reason>``). An image whose every annotation was skipped is left out (counted as
``images_all_annotations_skipped``) rather than written as a "no objects" example; images without
annotations are kept with ``"objects": []``. ``image`` is ``image_prefix/file_name`` (relative to the
JSONL unless the reader is given ``image_root``); ``image_id`` is the source id. A report is printed
and returned, and the category table (id, name and, where the source has them, ``frequency``,
``synonyms``, ``supercategory``, ``image_count``, ``instance_count``) is written beside the JSONL
as ``<out>.categories.json`` (an LVIS evaluator needs the frequencies for APr/APc/APf).

LVIS (``--format lvis``, or detected by ``--format auto``): the same layout, but no ``iscrowd``,
images carry ``coco_url`` instead of ``file_name`` (the file name is the URL's last path component)
and per-image ``not_exhaustive_category_ids`` / ``neg_category_ids``. Both lists are kept in each
record (metadata keys the record contract allows and does not read) as sorted category names,
``not_exhaustive_descs`` and ``neg_descs``, the desc vocabulary of the JSONL; their totals are counted
in the report.

Objects365 (``--format objects365``, or detected by ``--format auto``: annotations with ``isfake`` /
``isreflected``, or file names starting with ``objects365``): COCO rules; ``file_name`` may hold
sub-folders (``images/v1/patch8/...``), kept below ``--image-prefix``. Its per-annotation flags have
no place in the record contract (an object is ``desc`` + ``bbox_2d``): the objects are kept and the
flags counted (``objects365_isfake``, ``objects365_isreflected``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter, defaultdict

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.errors import InputError, add_debug_flag, run_cli  # noqa: E402

FORMATS = ("auto", "coco", "lvis", "objects365")
# Per-image LVIS lists: source key -> record key (category names, like desc).
LVIS_IMAGE_LISTS = {"not_exhaustive_category_ids": "not_exhaustive_descs", "neg_category_ids": "neg_descs"}
# Per-annotation Objects365 flags, counted in the report.
OBJECTS365_FLAGS = ("isfake", "isreflected")
# Category fields carried into <out>.categories.json when the source has them.
CATEGORY_FIELDS = ("frequency", "synonyms", "supercategory", "image_count", "instance_count", "def")
# Reasons a malformed annotation is refused (or, with --skip-invalid, skipped as skipped_<reason>).
INVALID_REASONS = ("bad_bbox", "negative_size", "outside_image", "unknown_image", "unknown_category")


def detect_format(coco: dict) -> str:
    """``"lvis"`` when any image has an LVIS per-image list or a ``coco_url`` without ``file_name``;
    ``"objects365"`` when an annotation has an Objects365 flag or a file name starts with ``objects365``."""
    for im in coco.get("images", []):
        if any(k in im for k in LVIS_IMAGE_LISTS) or ("file_name" not in im and "coco_url" in im):
            return "lvis"
    if any(any(k in a for k in OBJECTS365_FLAGS) for a in coco.get("annotations", [])[:1000]):
        return "objects365"
    if any(os.path.basename(str(im.get("file_name", ""))).startswith("objects365") for im in coco.get("images", [])[:1000]):
        return "objects365"
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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_image(im: dict, source: str) -> None:
    for key in ("width", "height"):
        v = im.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise InputError(f"{source}: image {im.get('id')}: {key}={v!r} is not a positive integer (the pixel "
                             "size boxes refer to); fix the image entry")


class _Invalid(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _box(a: dict, images: dict, names: dict) -> tuple[list[float], bool, bool]:
    """One annotation's pixel box ``[x1, y1, x2, y2]`` clipped to its image, whether clipping moved it,
    and whether it has zero area; raises :class:`_Invalid` for a malformed annotation."""
    if a.get("image_id") not in images:
        raise _Invalid("unknown_image", f"image_id {a.get('image_id')!r} is not in images")
    if a.get("category_id") not in names:
        raise _Invalid("unknown_category", f"category_id {a.get('category_id')!r} is not in categories")
    bbox = a.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
        raise _Invalid("bad_bbox", f"bbox={bbox!r} is not 4 finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise _Invalid("negative_size", f"bbox={bbox!r} has a negative width or height")
    im = images[a["image_id"]]
    W, H = im["width"], im["height"]
    x1, y1 = min(max(x, 0.0), W), min(max(y, 0.0), H)
    x2, y2 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
    if (w > 0 and x2 <= x1) or (h > 0 and y2 <= y1):
        raise _Invalid("outside_image", f"bbox={bbox!r} lies outside its {W}x{H} image {a['image_id']}")
    return [x1, y1, x2, y2], (x1, y1, x2, y2) != (x, y, x + w, y + h), x2 <= x1 or y2 <= y1


def convert(
    coco: dict,
    *,
    image_prefix: str = "",
    limit: int | None = None,
    source: str = "<coco>",
    fmt: str = "auto",
    skip_invalid: bool = False,
) -> tuple[list, Counter]:
    """COCO/LVIS/Objects365 dict -> (JSONL rows in image order, report counters).

    ``fmt``: auto | coco | lvis | objects365. ``skip_invalid``: skip and count malformed annotations
    instead of raising :class:`InputError` naming the first one.
    """
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
    annotated: set = set()  # images with at least one annotation (kept or skipped)
    images = {im["id"]: im for im in coco["images"]}
    for im in coco["images"]:
        _check_image(im, source)
    for i, a in enumerate(coco["annotations"]):
        report["annotations"] += 1
        annotated.add(a.get("image_id"))
        if a.get("iscrowd", 0):
            report["skipped_iscrowd"] += 1
            continue
        try:
            box, clipped, zero = _box(a, images, names)
        except _Invalid as exc:
            if not skip_invalid:
                ann = f"annotation {a['id']}" if "id" in a else f"annotation #{i} (no id)"
                raise InputError(f"{source}: {ann}: {exc}; fix or remove it, or pass --skip-invalid to skip "
                                 "and count such annotations") from None
            report[f"skipped_{exc.reason}"] += 1
            continue
        report["clipped_boxes"] += int(clipped)
        report["zero_area_boxes"] += int(zero)
        if fmt == "objects365":
            for flag in OBJECTS365_FLAGS:
                report[f"objects365_{flag}"] += int(bool(a.get(flag, 0)))
        by_image[a["image_id"]].append({"desc": names[a["category_id"]], "bbox_2d": box})
    rows = []
    report[f"format_{fmt}"] = 1
    for im in coco["images"]:
        objs = by_image.get(im["id"], [])
        if not objs and im["id"] in annotated:  # every annotation skipped: not a "no objects" example
            report["images_all_annotations_skipped"] += 1
            continue
        if limit is not None and len(rows) >= limit:
            report["images_beyond_limit"] += 1
            continue
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


def category_table(coco: dict) -> list[dict]:
    """The categories in source order: ``id``, ``name`` and the :data:`CATEGORY_FIELDS` the source has."""
    return [{"id": c["id"], "name": c["name"], **{k: c[k] for k in CATEGORY_FIELDS if k in c}}
            for c in coco["categories"]]


def categories_path(out: str) -> str:
    """``<out without .jsonl>.categories.json``: where :func:`main` writes :func:`category_table`."""
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".categories.json"


def main(argv: list[str] | None = None) -> Counter:
    ap = argparse.ArgumentParser(description="COCO / LVIS / Objects365 instances JSON -> CoordExp JSONL")
    ap.add_argument("--coco", required=True, help="COCO, LVIS or Objects365 instances JSON")
    ap.add_argument("--format", choices=FORMATS, default="auto",
                    help="auto: LVIS when images carry LVIS keys / coco_url only; Objects365 when annotations carry "
                         "isfake/isreflected or file names start with objects365; else COCO")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="skip malformed annotations (counted per reason) instead of failing on the first")
    ap.add_argument("--out", required=True, help="output JSONL path")
    ap.add_argument("--image-prefix", default="", help="prepended to each file_name, e.g. 'val2017'")
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N images")
    args = add_debug_flag(ap).parse_args(argv)
    with open(args.coco, encoding="utf-8") as fh:
        coco = json.load(fh)
    rows, report = convert(coco, image_prefix=args.image_prefix, limit=args.limit, source=args.coco, fmt=args.format,
                           skip_invalid=args.skip_invalid)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(categories_path(args.out), "w", encoding="utf-8") as fh:
        json.dump(category_table(coco), fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(report.items())), file=sys.stdout)
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
