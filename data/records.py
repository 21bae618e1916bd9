"""The JSONL record contract: read, validate, convert pixel boxes to bins, order objects.

One line per image::

    {"image": "imgs/0001.png", "width": 640, "height": 480,
     "objects": [{"desc": "black cat", "bbox_2d": [x1, y1, x2, y2]}, ...],
     "image_id": "0001"}                                   # image_id optional

``image`` is relative to ``image_root`` when given, else to the JSONL file's folder
(absolute paths are kept). Boxes are pixels in the original image (``coords="pixel"``)
or already bins 0..999 (``coords="bins"``); a box written as four coord tokens
(``["<|coord_10|>", ...]``) is bins in either mode. Unknown keys are errors (only
``bbox_2d`` geometry is read; a ``poly`` is refused, not ignored). See docs/DATA.md for the
full rule set.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from configs.errors import LINE_CHARS, UserError, clip, did_you_mean
from core.vocab import NUM_COORD_BINS
from data.coordjson import parse_coord_token
from data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRefused, check_header
from data.types import GTObject, Record

MAX_BIN = NUM_COORD_BINS - 1

MAX_LINE_BYTES = 64 << 20  # one JSONL record; a longer line is an error, never read whole
COORD_MODES = ("pixel", "bins")
OBJECT_ORDERS = ("yx", "none")

# Qwen special tokens (<|im_end|>, <|coord_5|>, <|image_pad|>, ...) are matched inside any text
# by the tokenizer; inside a desc they would become control tokens and break the answer.
_SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")


class DataError(UserError, ValueError):
    """A record violates the JSONL contract. ``source`` is ``file:line``, ``reason`` a short code."""

    SKIP_HINT = "Fix the record, or set data.skip_invalid: true to skip such lines (they are counted in the DataReport)."

    def __init__(self, source: str, field_name: str, reason: str, detail: str, fix: str = SKIP_HINT):
        self.source = source
        self.field = field_name
        self.reason = reason
        self.detail = detail = clip(detail, LINE_CHARS)  # a detail may quote a value as long as the line
        super().__init__(f"{source}: field {field_name!r}: {detail} [{reason}]. {fix}")


@dataclass
class DataReport:
    """What ``read_jsonl`` read, kept, skipped (per reason) and truncated. Nothing is dropped silently."""

    path: str
    lines: int = 0  # non-blank lines seen
    blank_lines: int = 0
    records: int = 0  # records kept
    objects: int = 0  # objects kept (after max_objects truncation)
    empty_records: int = 0  # kept records without objects
    skipped: Counter = field(default_factory=Counter)  # reason -> lines skipped
    skipped_examples: list[str] = field(default_factory=list)  # first messages, for the log
    truncated_records: int = 0  # records cut by max_objects
    truncated_objects: int = 0  # objects removed by max_objects

    @property
    def skipped_total(self) -> int:
        return int(sum(self.skipped.values()))

    def summary(self) -> str:
        parts = [
            f"{self.path}: {self.records} records, {self.objects} objects "
            f"({self.empty_records} records without objects) from {self.lines} lines"
        ]
        if self.skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            parts.append(f"skipped {self.skipped_total} lines ({reasons})")
        if self.truncated_records:
            parts.append(
                f"max_objects truncated {self.truncated_records} records ({self.truncated_objects} objects removed)"
            )
        return "; ".join(parts)


def pixel_to_bin(x: float, size: float) -> int:
    """Pixel coordinate -> bin: ``clamp(round(999 * x / size), 0, 999)`` (docs/DATA.md).

    ``round`` is Python's (ties to even), so ``x = size/2`` maps to bin 500 for any size.
    """
    return min(MAX_BIN, max(0, int(round(MAX_BIN * float(x) / float(size)))))


def bin_to_pixel(k: int | float, size: float) -> float:
    """Bin (0..999, or a continuous decoded value in bin units) -> pixels: ``k / 999 * size``."""
    return float(k) / MAX_BIN * float(size)


def bins_to_pixels(bins: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """Bins ``[x1, y1, x2, y2]`` (0..999) -> pixel corners in an image of ``width`` x ``height``."""
    x1, y1, x2, y2 = bins
    return (bin_to_pixel(x1, width), bin_to_pixel(y1, height), bin_to_pixel(x2, width), bin_to_pixel(y2, height))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


RECORD_KEYS = ("image", "width", "height", "objects", "image_id")
# Record keys that are allowed but not read: the LVIS per-image desc lists scripts/coco_to_jsonl.py keeps.
RECORD_METADATA_KEYS = ("not_exhaustive_descs", "neg_descs")
OBJECT_KEYS = ("desc", "bbox_2d")
# Geometry other readers (the original CoordExp, LVIS/COCO tools) write next to or instead of a box.
# Only bbox_2d is trained on; such a key is refused so polygon data is never silently boxed-only.
UNSUPPORTED_GEOMETRY = ("poly", "polygon", "segmentation", "mask", "points", "line", "quad", "bbox")


def _check_keys(raw: dict, allowed: tuple[str, ...], where: str, source: str) -> None:
    """Every key of ``raw`` must be in ``allowed``: an ignored key would be data the user thinks is used."""
    for key in raw:
        if key in allowed:
            continue
        field_name = f"{where}.{key}" if where else str(key)
        if where and key in UNSUPPORTED_GEOMETRY:
            raise DataError(
                source, field_name, "unsupported_geometry",
                f"{key!r} geometry is not supported (polygons, masks and points are not read; only bbox_2d boxes are); "
                f"convert each object to a bbox_2d (e.g. the polygon's bounding box) and remove {key!r}",
            )
        raise DataError(
            source, field_name, "unknown_key",
            f"unknown key{did_you_mean(str(key), allowed)}; allowed keys here: {', '.join(allowed)} "
            f"(unknown keys are refused, not ignored; remove it)",
        )


def _lone_surrogate(text: str) -> bool:
    """True if ``text`` holds a lone UTF-16 surrogate (a JSON ``\\ud800`` escape): not encodable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _coord_token_box(box: list) -> tuple[int, int, int, int] | None:
    """Bins of a box written as coord-token strings (``["<|coord_10|>", ...]``); None if it is not one."""
    if not any(isinstance(v, str) for v in box):
        return None
    bins = [parse_coord_token(v) if isinstance(v, str) else None for v in box]
    return None if any(b is None for b in bins) else tuple(bins)


def _parse_object(obj: object, j: int, width: int, height: int, coords: str, source: str) -> GTObject:
    where = f"objects[{j}]"
    if not isinstance(obj, dict):
        raise DataError(source, where, "bad_object", f"must be an object, got {type(obj).__name__}")
    _check_keys(obj, OBJECT_KEYS, where, source)
    if "desc" not in obj:
        raise DataError(source, f"{where}.desc", "missing_desc", "missing; every object needs a non-empty desc")
    desc = obj["desc"]
    if not isinstance(desc, str):
        raise DataError(source, f"{where}.desc", "bad_desc", f"must be a string, got {type(desc).__name__}")
    if not desc.strip():
        raise DataError(source, f"{where}.desc", "empty_desc", f"is empty or whitespace ({desc!r})")
    if _lone_surrogate(desc):
        raise DataError(
            source, f"{where}.desc", "bad_desc",
            f"{desc!r} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is not text; "
            "fix the escape in the converter",
        )
    if _SPECIAL_TOKEN_RE.search(desc):
        raise DataError(
            source,
            f"{where}.desc",
            "special_token_in_desc",
            f"{desc!r} contains special-token text (<|...|>), which the tokenizer would turn into a control token",
        )
    if "bbox_2d" not in obj:
        raise DataError(source, f"{where}.bbox_2d", "missing_bbox", "missing; expected [x1, y1, x2, y2]")
    box = obj["bbox_2d"]
    if not isinstance(box, list) or len(box) != 4:
        n = len(box) if isinstance(box, list) else type(box).__name__
        raise DataError(source, f"{where}.bbox_2d", "bad_bbox_arity", f"must be a list of 4 numbers, got {n}")
    token_bins = _coord_token_box(box)
    if token_bins is not None:  # already bins, whatever data.coords says: the tokens name them
        coords, box = "bins", list(token_bins)
    elif not all(_is_number(v) for v in box):
        raise DataError(
            source, f"{where}.bbox_2d", "bad_bbox_value",
            f"values must be 4 finite numbers or 4 coord tokens '<|coord_k|>' (k in 0..{MAX_BIN}), got {box}",
        )
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        raise DataError(
            source, f"{where}.bbox_2d", "inverted_box", f"needs x1 <= x2 and y1 <= y2, got {box} (x2 < x1 or y2 < y1)"
        )
    if coords == "bins":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in box) or min(box) < 0 or max(box) > MAX_BIN:
            raise DataError(
                source, f"{where}.bbox_2d", "box_outside_image", f"bins must be integers in 0..{MAX_BIN}, got {box}"
            )
        return GTObject(desc=unicodedata.normalize("NFC", desc), bins=(x1, y1, x2, y2))
    # No tolerance: a pixel box must lie inside [0, width] x [0, height]. Converters clip
    # (COCO boxes sometimes overshoot by a fraction of a pixel) so the contract stays exact.
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise DataError(
            source,
            f"{where}.bbox_2d",
            "box_outside_image",
            f"box {box} is outside the image [0, {width}] x [0, {height}] (no tolerance; clip in the converter)",
        )
    bins = (pixel_to_bin(x1, width), pixel_to_bin(y1, height), pixel_to_bin(x2, width), pixel_to_bin(y2, height))
    # NFC: Qwen's tokenizer normalises to NFC, so a decoded answer can only ever hold NFC text;
    # storing GT descs in NFC keeps GT and parsed predictions comparable (eval categories).
    return GTObject(desc=unicodedata.normalize("NFC", desc), bins=bins)


def order_objects(objects: list[GTObject] | tuple[GTObject, ...]) -> list[GTObject]:
    """Top-to-bottom then left-to-right on bins ``(y1, x1)``, then desc, then ``(y2, x2)`` (total order)."""
    return sorted(objects, key=lambda o: (o.bins[1], o.bins[0], o.desc, o.bins[3], o.bins[2]))


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_record(
    line: str,
    source: str,
    *,
    base_dir: str,
    coords: str = "pixel",
    object_order: str = "yx",
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Record:
    """Validate one JSONL line into a ``Record`` (bins, ordered). Raises ``DataError`` naming ``source``.

    ``check_images``: the image's header is opened (``data.images.check_header``: readable, at most
    ``max_image_pixels``, the record's width x height); its pixels are decoded only when a sample is encoded."""
    try:
        raw = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DataError(source, "<line>", "not_json", f"line is not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(source, "<line>", "too_deep", "JSON nested too deeply to read (a record is 4 levels deep)") from None
    except _DuplicateKey as e:
        raise DataError(
            source, e.key, "duplicate_key",
            f"key {e.key!r} appears twice in one JSON object (JSON readers silently keep the last); keep one",
        ) from None
    if not isinstance(raw, dict):
        raise DataError(source, "<line>", "not_object", f"line must be a JSON object, got {type(raw).__name__}")
    _check_keys(raw, RECORD_KEYS + RECORD_METADATA_KEYS, "", source)
    for key in ("image", "width", "height", "objects"):
        if key not in raw:
            raise DataError(source, key, "missing_field", "missing; required: image, width, height, objects")
    width, height = raw["width"], raw["height"]
    for key, v in (("width", width), ("height", height)):
        if not _is_pos_int(v):
            raise DataError(source, key, "bad_size", f"must be a positive integer (pixels), got {v!r}")
    image = raw["image"]
    if not isinstance(image, str) or not image or _lone_surrogate(image):
        raise DataError(source, "image", "bad_image", f"must be a non-empty path string, got {image!r}")
    image_path = image if os.path.isabs(image) else os.path.normpath(os.path.join(base_dir, image))
    if check_images and not os.path.isfile(image_path):
        what = "is a directory, not an image file" if os.path.isdir(image_path) else "image file not found"
        raise DataError(source, "image", "missing_image", f"{what}: {image_path}")
    objs = raw["objects"]
    if not isinstance(objs, list):
        raise DataError(source, "objects", "bad_objects", f"must be a list, got {type(objs).__name__}")
    objects = [_parse_object(o, j, width, height, coords, source) for j, o in enumerate(objs)]
    if object_order == "yx":
        objects = order_objects(objects)
    image_id = raw.get("image_id", image)
    if not isinstance(image_id, (str, int)) or isinstance(image_id, bool) or (isinstance(image_id, str) and _lone_surrogate(image_id)):
        raise DataError(source, "image_id", "bad_image_id", f"must be a string or integer, got {image_id!r}")
    if check_images:  # last: a line's own contract errors are reported before its image is opened
        _check_image_header(image_path, width, height, max_image_pixels, source)
    return Record(
        image_path=image_path,
        width=width,
        height=height,
        objects=tuple(objects),
        image_id=str(image_id),
        source=source,
    )


def _check_image_header(path: str, width: int, height: int, max_pixels: int, source: str) -> None:
    try:
        check_header(path, width, height, max_pixels)
    except ImageRefused as e:
        reason = "image_size_mismatch" if str(e).startswith("record says") else "image_too_large"
        raise DataError(source, "image" if reason == "image_too_large" else "width/height", reason, str(e)) from None
    except OSError as e:
        raise DataError(source, "image", "bad_image", f"cannot read {path}: {e}") from None


def iter_utf8_lines(path: str | os.PathLike, span: tuple[int, int, int] | None = None):
    """``(lineno, text, None)`` per line of ``path`` (1-based), or ``(lineno, None, (reason, detail))`` for a line that
    is not UTF-8, so one bad line is reported with its number (and can be skipped) instead of a bare
    ``UnicodeDecodeError`` for the whole file. Lines are split on ``\\n`` only; text keeps its line end.
    A UTF-8 byte-order mark at the start of the file (Windows tools write one) is not part of line 1; a line
    over ``MAX_LINE_BYTES`` is reported (like a line that is not UTF-8) without being held in memory.
    ``span=(start, stop, lineno)``: only the lines that start in bytes ``[start, stop)`` (``start`` at a line
    start, which is line ``lineno``; ``data.table`` validates the parts of a file in parallel)."""
    start, stop, lineno = span if span is not None else (0, None, 1)
    with open(path, "rb") as fh:
        fh.seek(start)
        lineno -= 1
        while stop is None or fh.tell() < stop:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if len(raw) > MAX_LINE_BYTES:  # read the rest of it in bounded pieces, never whole
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_LINE_BYTES)
                yield lineno, None, ("line_too_long", f"line is longer than {MAX_LINE_BYTES >> 20} MiB; no record is that large")
                continue
            try:
                yield lineno, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield lineno, None, ("not_utf8", f"line is not UTF-8 (byte {raw[e.start]:#04x} at byte offset {e.start}); "
                                     "re-encode the file as UTF-8")


def read_jsonl(path: str | os.PathLike, **options: Any) -> tuple[list[Record], DataReport]:
    """Read and validate a JSONL file of records (contract in the module docstring and docs/DATA.md).

    ``options``: those of :func:`iter_jsonl` (``image_root``, ``coords``, ``object_order``, ``max_objects``,
    ``skip_invalid``, ``check_images``, ``max_image_pixels``). Pixel boxes become bins
    ``k = clamp(round(999*x/width), 0, 999)``. Objects are ordered by ``(y1, x1)`` in bins, then desc, unless
    ``object_order="none"``. ``max_objects`` keeps the first objects after ordering. ``skip_invalid=False``
    raises ``DataError`` (``file:line``, field) at the first bad line; ``True`` skips bad lines and counts each
    reason in the report. Duplicate ``image_id`` (default: the ``image`` string) is an error: eval keys
    predictions by it.
    """
    report = DataReport(path=os.fspath(path))
    records = list(iter_jsonl(path, report, **options))
    return records, report


def iter_jsonl(
    path: str | os.PathLike,
    report: DataReport,
    *,
    image_root: str | os.PathLike | None = None,
    coords: str = "pixel",
    object_order: str = "yx",
    max_objects: int | None = None,
    skip_invalid: bool = False,
    check_images: bool = True,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    span: tuple[int, int, int] | None = None,
) -> Iterator[Record]:
    """The records of :func:`read_jsonl` one at a time (same checks, same errors), filling ``report``
    as it goes: what ``data.table`` streams into its Arrow cache without holding every record.
    ``span``: only that part of the file (``iter_utf8_lines``; ``data.table`` validates parts in
    parallel); duplicate ``image_id``s are then checked within the part only, and an empty part is no error."""
    if coords not in COORD_MODES:
        raise ValueError(f"data.coords={coords!r} is not allowed; allowed: {', '.join(COORD_MODES)}")
    if object_order not in OBJECT_ORDERS:
        raise ValueError(f"data.object_order={object_order!r} is not allowed; allowed: {', '.join(OBJECT_ORDERS)}")
    if max_objects is not None and (not isinstance(max_objects, int) or max_objects < 0):
        raise ValueError(f"data.max_objects must be null or an integer >= 0, got {max_objects!r}")
    path = os.fspath(path)
    base_dir = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
    seen_ids: dict[str, str] = {}
    for lineno, line, unreadable in iter_utf8_lines(path, span):
        source = f"{path}:{lineno}"
        if line is not None and not line.strip():
            report.blank_lines += 1
            continue
        report.lines += 1
        try:
            if line is None:
                raise DataError(source, "<line>", *unreadable)
            rec = parse_record(
                line,
                source,
                base_dir=base_dir,
                coords=coords,
                object_order=object_order,
                check_images=check_images,
                max_image_pixels=max_image_pixels,
            )
            if rec.image_id in seen_ids:
                raise DataError(
                    source,
                    "image_id",
                    "duplicate_image_id",
                    f"{rec.image_id!r} already used at {seen_ids[rec.image_id]}; give each line a unique image_id",
                )
        except DataError as e:
            if not skip_invalid:
                if e.reason == "missing_image":  # almost always the image root, not the record
                    raise DataError(e.source, e.field, e.reason, e.detail,
                                    fix=_image_root_hint(image_root) + " " + DataError.SKIP_HINT) from None
                raise
            report.skipped[e.reason] += 1
            if len(report.skipped_examples) < 20:
                report.skipped_examples.append(str(e))
            continue
        seen_ids[rec.image_id] = source
        if max_objects is not None and len(rec.objects) > max_objects:
            report.truncated_records += 1
            report.truncated_objects += len(rec.objects) - max_objects
            rec = Record(
                image_path=rec.image_path,
                width=rec.width,
                height=rec.height,
                objects=rec.objects[:max_objects],
                image_id=rec.image_id,
                source=rec.source,
            )
        report.records += 1
        report.objects += len(rec.objects)
        report.empty_records += int(not rec.objects)
        yield rec
    if report.lines == 0 and span is None:
        raise DataError(
            path, "<file>", "empty_file",
            f"has no records ({report.blank_lines} blank lines); a JSONL file needs one record per line",
            fix="Point the config at the right file, or remove the key if this split is not used.",
        )


def require_records(report: DataReport, image_root: str | os.PathLike | None = None) -> None:
    """A split whose every line ``data.skip_invalid`` skipped cannot train or evaluate: one ``DataError``
    (``no_records``) naming the reasons, and, when images were missing, where they were looked up
    (``data.image_root`` first; not ``skip_invalid``, which is already on). The trainers call it on each split."""
    if not report.lines or report.records:
        return
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
    hint = (_image_root_hint(image_root) if "missing_image" in report.skipped
            else f"First: {report.skipped_examples[0]}" if report.skipped_examples else "")
    raise DataError(report.path, "<file>", "no_records",
                    f"data.skip_invalid skipped all {report.lines} lines ({reasons})", fix=hint)


def _image_root_hint(image_root) -> str:
    """What to check first when an image is not found: the root relative image paths were looked up in."""
    where = (f"now {clip(os.fspath(image_root), 200)!r}" if image_root is not None
             else "not set: paths are relative to the JSONL's folder")
    return f"Check data.image_root first ({where}; for COCO, the folder holding train2017/, docs/DATA.md)."


def record_to_json(record: Record, *, relative_to: str | None = None) -> dict:
    """A ``Record`` back to a JSONL dict with **bin** boxes (read it back with ``coords="bins"``)."""
    image = record.image_path if relative_to is None else os.path.relpath(record.image_path, relative_to)
    return {
        "image": image,
        "width": record.width,
        "height": record.height,
        "image_id": record.image_id,
        "objects": [{"desc": o.desc, "bbox_2d": list(o.bins)} for o in record.objects],
    }
