"""The one COCO helper (docs/EVAL.md): in-memory GT-vs-prediction records in, COCO bbox metrics out.

The offline CLI (``eval.evaluate``), the in-loop evaluator (``eval.inloop``) and both
Stage-2 trainers call :func:`evaluate_detection`; no COCO preparation code lives
anywhere else.

Record format (one per image; a ``Mapping`` or a :class:`DetectionRecord`)::

    {"image_id": "000123" | 123,          # any str/int, unique across records
     "width": 640, "height": 480,         # original image size in pixels
     "coords": "pixel",                   # optional: "pixel" (default) or "bins"
     "image": "images/000123.jpg",        # optional, used by eval.visualize
     "gt":   [{"desc": "black cat", "bbox_2d": [x1, y1, x2, y2]}, ...],
     "pred": [{"desc": "black cat", "bbox_2d": [x1, y1, x2, y2], "score": 0.93}, ...]}

Boxes are pixel corners ``[x1, y1, x2, y2]`` in the original image, or, when the
record (or the ``coords=`` argument) says ``"bins"``, integer bins 0..999 that are
converted with ``pixel = bin / 999 * size`` (docs/DATA.md). A missing ``score`` is 1.0.
Other keys (``raw_text``, ``parse_valid`` ...) are carried by the JSONL but ignored here.

A malformed *prediction* (not a mapping, missing desc/bbox_2d, a bbox_2d that is not 4 finite
numbers such as nested points ``[[1, 2], [10, 12]]``, a score that is not a finite number in
[0, 1]) is dropped and counted (``pred_invalid_count`` and ``pred_invalid_<reason>_count``):
one bad model output never aborts an evaluation. A malformed GT object or record is an error.

Categories are the distinct *normalised* GT desc strings (``eval.semantic.normalize_desc``; plus an
LVIS record's ``neg_descs`` / ``not_exhaustive_descs``). A predicted desc maps onto them with
``eval.semantic.CategoryMapper`` (exact, then the ``eval.semantic`` encoder when configured); one
that maps to none is counted in ``pred_unmapped_count``, left out of AP and is a false positive
for F1. F1-ish (``eval.f1ish``) is computed for every report; LVIS records (or ``metrics="lvis"``)
get the federated LVIS evaluation (``eval.lvis_eval``) instead of COCO. Degenerate boxes (zero or
negative width/height) are kept (they can never reach IoU > 0) and counted.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from configs.errors import InputError
from data.boxes import iou_matrix
from data.records import COORD_MODES, RECORD_METADATA_KEYS, bins_to_pixels
from eval.f1ish import SCOPES as F1ISH_SCOPES
from eval.f1ish import image_f1ish, oracle_image, oracle_summarize
from eval.f1ish import key_prefix as f1ish_key
from eval.f1ish import summarize as f1ish_summarize
from eval.semantic import CategoryMapper, normalize_desc
from rollout.metrics import precision_recall_f1

F1ISH_DEFAULT_IOUS = (0.3, 0.5)  # = the eval.f1ish.iou_thresholds default (configs.types.F1ishConfig)

BACKENDS = ("pycocotools", "faster_coco_eval")

# COCO summary order (COCOeval.stats indices 0..11).
COCO_METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

# COCO's area ranges (pixels²) used to count GT per size bucket.
_SMALL_MAX = 32.0**2
_MEDIUM_MAX = 96.0**2
# Size-range metrics and their pycocotools area range (inclusive at both ends, as COCOeval
# ignores GT with area < lo or > hi). With no GT in the range the metric is not evaluated and
# is reported as NOT_EVALUATED (-1), as pycocotools does: a 0.0 there would be a false measurement.
NOT_EVALUATED = -1.0
_AREA_RANGES = {"small": (0.0, _SMALL_MAX), "medium": (_SMALL_MAX, _MEDIUM_MAX), "large": (_MEDIUM_MAX, math.inf)}
AREA_METRICS: dict[str, str] = {"APs": "small", "APm": "medium", "APl": "large",
                                "ARs": "small", "ARm": "medium", "ARl": "large"}  # fmt: skip
# Why a prediction was dropped at ingestion (counter ``pred_invalid_<reason>_count``).
PRED_INVALID_REASONS: tuple[str, ...] = ("object", "box", "score")



# --------------------------------------------------------------------------- contracts
@dataclass(frozen=True)
class DetectionObject:
    """One GT or predicted object; ``bbox_2d`` in pixels ``[x1, y1, x2, y2]``; ``score`` None on GT."""

    desc: str
    bbox_2d: tuple[float, float, float, float]
    score: float | None = None


@dataclass(frozen=True)
class DetectionRecord:
    """GT vs predictions of one image. Boxes are pixels unless ``coords == "bins"``."""

    image_id: str | int
    width: int
    height: int
    gt: tuple[DetectionObject, ...] = ()
    pred: tuple[DetectionObject, ...] = ()
    coords: str = "pixel"
    image: str | None = None
    pred_invalid: tuple[str, ...] = ()  # reasons (PRED_INVALID_REASONS) of predictions dropped at ingestion
    # LVIS per-image lists (data/records.py RECORD_METADATA_KEYS): descs verified absent / not exhaustively annotated.
    neg_descs: tuple[str, ...] = ()
    not_exhaustive_descs: tuple[str, ...] = ()
    lvis: bool = False  # the record carried the LVIS lists (federated evaluation)
    samples: tuple[tuple[DetectionObject, ...], ...] = ()  # Oracle-K: the valid predictions of K sampled rollouts


@dataclass
class DetectionReport:
    """Result of :func:`evaluate_detection`.

    metrics: ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (COCO,
        in [0, 1]; a size-range metric is ``NOT_EVALUATED`` = -1 when the set has no GT in
        that range, like pycocotools; see also the ``gt_*_count`` counters) plus
        ``F1@<iou>``, ``precision@<iou>``, ``recall@<iou>``.
    per_category: normalised GT desc -> AP (IoU .50:.95, all areas, 100 dets).
    counters: integer counts (images, objects, unknown descs, degenerate boxes, F1 TP/FP/FN ...).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    per_category: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    backend: str = "pycocotools"
    f1_iou: float = 0.5
    f1ish: dict[str, float] = field(default_factory=dict)
    oracle_k: dict[str, float] = field(default_factory=dict)  # empty unless the records carry samples
    semantic_model: str | None = None
    # Artifact material (eval.artifacts), not part of to_dict(): per image the record and its mapped objects,
    # per image the F1-ish result of every threshold/scope, and the COCO sets that were evaluated.
    images: list[dict] = field(default_factory=list, repr=False)
    image_f1ish: list[dict] = field(default_factory=list, repr=False)
    coco_gt: dict = field(default_factory=dict, repr=False)
    coco_preds: list[dict] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("metrics", "per_category", "counters", "backend", "f1_iou", "f1ish",
                                               "oracle_k", "semantic_model")}


# --------------------------------------------------------------------------- parsing
class InvalidObject(ValueError):
    """A GT or predicted object that cannot be evaluated; ``reason`` is one of ``PRED_INVALID_REASONS``."""

    def __init__(self, where: str, reason: str, msg: str):
        self.reason = reason
        super().__init__(f"{where}: {msg}")


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _parse_box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise InvalidObject(where, "box", f"bbox_2d must be a list of 4 numbers [x1, y1, x2, y2], got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise InvalidObject(where, "box", f"bbox_2d must hold 4 finite numbers, got {value!r}")
        out.append(float(v))
    return (out[0], out[1], out[2], out[3])


def _parse_object(obj: Any, where: str, is_pred: bool) -> DetectionObject:
    if isinstance(obj, DetectionObject):
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidObject(where, "object", f"object must be a mapping with desc and bbox_2d, got {type(obj).__name__}")
    if "desc" not in obj or "bbox_2d" not in obj:
        raise InvalidObject(where, "object", f"object needs keys 'desc' and 'bbox_2d', got keys {sorted(obj)}")
    score = None
    if is_pred:
        raw = obj.get("score", None)
        if raw is not None:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0.0 <= float(raw) <= 1.0:
                raise InvalidObject(where, "score", f"score must be a finite number in [0, 1], got {raw!r}")
            score = float(raw)
    return DetectionObject(desc=str(obj["desc"]), bbox_2d=_parse_box(obj["bbox_2d"], where), score=score)


def _parse_preds(items: Sequence[Any], where: str) -> tuple[tuple[DetectionObject, ...], tuple[str, ...]]:
    """Valid predictions, and the reasons of the ones dropped (a bad model output is counted, not fatal)."""
    kept, dropped = [], []
    for i, o in enumerate(items):
        try:
            kept.append(_parse_object(o, f"{where} pred[{i}]", is_pred=True))
        except InvalidObject as e:
            dropped.append(e.reason)
    return tuple(kept), tuple(dropped)


def to_detection_record(rec: Mapping | DetectionRecord, *, coords: str = "pixel", where: str = "record") -> DetectionRecord:
    """Validate one record (mapping or dataclass) and return it as a :class:`DetectionRecord`.

    ``coords`` is the default when the record has no ``coords`` key. Errors name ``where``
    (e.g. ``predictions.jsonl:12``) and the field.
    """
    if isinstance(rec, DetectionRecord):
        if rec.coords not in COORD_MODES:
            raise _fail(where, f"coords must be one of {COORD_MODES}, got {rec.coords!r}")
        return rec
    if not isinstance(rec, Mapping):
        raise _fail(where, f"record must be a mapping or DetectionRecord, got {type(rec).__name__}")
    for key in ("image_id", "width", "height"):
        if key not in rec:
            raise _fail(where, f"missing required key {key!r} (record keys: {sorted(rec)})")
    width, height = rec["width"], rec["height"]
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise _fail(where, f"{name} must be a positive number of pixels, got {v!r}")
    mode = rec.get("coords", coords)
    if mode not in COORD_MODES:
        raise _fail(where, f"coords must be one of {COORD_MODES}, got {mode!r}")
    lists = {}
    for key in ("gt", "pred"):
        items = rec.get(key, [])
        if items is None:
            items = []
        if not isinstance(items, (list, tuple)):
            raise _fail(where, f"{key!r} must be a list of objects, got {type(items).__name__}")
        lists[key] = items
    gt = tuple(_parse_object(o, f"{where} gt[{i}]", is_pred=False) for i, o in enumerate(lists["gt"]))
    pred, pred_invalid = _parse_preds(lists["pred"], where)
    # Drops already counted by read_predictions (which hands on only the valid predictions).
    carried = rec.get("pred_invalid", [])
    if not isinstance(carried, (list, tuple)) or any(r not in PRED_INVALID_REASONS for r in carried):
        raise _fail(where, f"pred_invalid must be a list of {PRED_INVALID_REASONS}, got {carried!r}")
    lvis_lists = {}
    for key in RECORD_METADATA_KEYS:  # the LVIS lists: neg_descs, not_exhaustive_descs
        items = rec.get(key, [])
        if not isinstance(items, (list, tuple)) or not all(isinstance(d, str) for d in items):
            raise _fail(where, f"{key} must be a list of desc strings (LVIS, docs/DATA.md), got {items!r}")
        lvis_lists[key] = tuple(items)
    samples = rec.get("samples", [])
    if not isinstance(samples, (list, tuple)) or not all(isinstance(x, Mapping) for x in samples):
        raise _fail(where, f"samples must be a list of {{'pred': [...]}} (Oracle-K rollouts), got {type(samples).__name__}")
    parsed_samples = tuple(_parse_preds(x.get("pred") or [], f"{where} samples[{k}]")[0] for k, x in enumerate(samples))
    return DetectionRecord(
        **lvis_lists,
        samples=parsed_samples,
        lvis=any(k in rec for k in lvis_lists),
        image_id=rec["image_id"],
        width=int(width) if float(width).is_integer() else width,
        height=int(height) if float(height).is_integer() else height,
        gt=gt,
        pred=pred,
        coords=mode,
        image=rec.get("image"),
        pred_invalid=tuple(carried) + pred_invalid,
    )


def _pixel_box(obj: DetectionObject, rec: DetectionRecord) -> tuple[float, float, float, float]:
    if rec.coords == "bins":
        return bins_to_pixels(obj.bbox_2d, rec.width, rec.height)
    return obj.bbox_2d


def _is_degenerate(box: Sequence[float]) -> bool:
    return not (box[2] > box[0] and box[3] > box[1])


def _xywh(box: Sequence[float]) -> list[float]:
    # Degenerate boxes become zero-area boxes: IoU 0 with everything, never a crash.
    return [box[0], box[1], max(0.0, box[2] - box[0]), max(0.0, box[3] - box[1])]


def _ious(preds: Sequence[Sequence[float]], gts: Sequence[Sequence[float]]) -> list[list[float]]:
    """``ious[p][g]``: the one IoU (``data.boxes``) of every prediction with every GT box."""
    return iou_matrix(preds, gts).reshape(len(preds), len(gts)).tolist()


# --------------------------------------------------------------------------- F1
def _greedy_f1_counts(
    gts: list[tuple[str, tuple[float, ...]]], preds: list[tuple[str, tuple[float, ...], float]], iou_thr: float
) -> int:
    """True positives of one image: per category, predictions in descending score order
    (stable) each take the still-unmatched GT with the highest IoU >= ``iou_thr``."""
    tp = 0
    iou = iou_matrix([box for _, box, _ in preds], [box for _, box in gts])
    order = sorted(range(len(preds)), key=lambda i: -preds[i][2])
    taken = [False] * len(gts)
    for i in order:
        cat = preds[i][0]
        best, best_j = -1.0, -1
        for j, (gcat, _) in enumerate(gts):
            if taken[j] or gcat != cat:
                continue
            if iou[i, j] >= iou_thr and iou[i, j] > best:
                best, best_j = float(iou[i, j]), j
        if best_j >= 0:
            taken[best_j] = True
            tp += 1
    return tp


# --------------------------------------------------------------------------- COCO
def _coco_classes(backend: str):
    if backend == "pycocotools":
        try:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        except ImportError as e:  # pragma: no cover - pycocotools is in requirements.txt
            raise ImportError("backend='pycocotools' needs pycocotools: pip install pycocotools") from e
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        except ImportError as e:
            raise ImportError(
                "backend='faster_coco_eval' needs the faster-coco-eval package: pip install faster-coco-eval "
                "(or use backend='pycocotools')"
            ) from e
        return COCO, COCOeval
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _run_coco(
    backend: str,
    images: list[dict],
    categories: list[dict],
    gt_anns: list[dict],
    dt_anns: list[dict],
) -> tuple[np.ndarray, np.ndarray]:
    """Run COCOeval (bbox); returns (stats[12], precision[T, R, K, A, M])."""
    COCO, COCOeval = _coco_classes(backend)
    sink = io.StringIO()
    # COCO prints progress on every call; silence it so logs stay one line per step.
    with contextlib.redirect_stdout(sink):
        dataset = {"images": images, "categories": categories, "annotations": gt_anns}
        if backend == "faster_coco_eval":
            # faster-coco-eval's COCO takes the dict itself; loadRes fills id/area/iscrowd.
            coco_gt = COCO(dataset)
            coco_dt = coco_gt.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in dt_anns])
        else:
            coco_gt = COCO()
            coco_gt.dataset = dataset
            coco_gt.createIndex()
            # Build the detection set directly (not loadRes): the same fields loadRes would set,
            # without its file / list special cases.
            coco_dt = COCO()
            coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_anns}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64), np.asarray(ev.eval["precision"])


def _zero_metrics(f1_keys: tuple[str, str, str], gt_areas: Sequence[float]) -> dict[str, float]:
    """Metrics when COCO does not run (no GT or no predictions): 0.0, or NOT_EVALUATED for a size
    range without GT (what pycocotools would report)."""
    out = {k: 0.0 for k in COCO_METRIC_NAMES}
    for name, bucket in AREA_METRICS.items():
        lo, hi = _AREA_RANGES[bucket]
        if not any(lo <= a <= hi for a in gt_areas):
            out[name] = NOT_EVALUATED
    for k in f1_keys:
        out[k] = 0.0
    return out


METRIC_FAMILIES = ("coco", "lvis", "f1ish", "both")


@dataclass
class _Prepared:
    """The evaluated set in COCO form plus each image's mapped objects (for F1 / F1-ish / artifacts)."""

    images: list[dict]
    categories: list[dict]
    gt_anns: list[dict]
    dt_anns: list[dict]
    counters: dict[str, int]
    per_image: list[dict]


def _counters(recs: Sequence[DetectionRecord], n_categories: int) -> dict[str, int]:
    return {
        "images": len(recs), "categories": n_categories, "gt_objects": 0, "pred_objects": 0,
        "pred_unmapped_count": 0, "pred_exact_count": 0, "pred_semantic_count": 0,
        "pred_degenerate_count": 0, "pred_default_score_count": 0, "pred_invalid_count": 0,
        **{f"pred_invalid_{reason}_count": 0 for reason in PRED_INVALID_REASONS},
        "gt_degenerate_count": 0, "gt_small_count": 0, "gt_medium_count": 0, "gt_large_count": 0,
        "images_without_pred_count": 0, "images_without_gt_count": 0,
        "f1_tp_count": 0, "f1_fp_count": 0, "f1_fn_count": 0,
    }  # fmt: skip


def _prepare(recs: Sequence[DetectionRecord], mapper: CategoryMapper, f1_iou: float) -> _Prepared:
    cat_ids = {name: k + 1 for k, name in enumerate(mapper.categories)}
    counters = _counters(recs, len(cat_ids))
    images, gt_anns, dt_anns, per_image = [], [], [], []
    for img_idx, r in enumerate(recs, start=1):
        images.append({"id": img_idx, "width": r.width, "height": r.height,
                       "neg_category_ids": sorted(cat_ids[normalize_desc(d)] for d in r.neg_descs),
                       "not_exhaustive_category_ids": sorted(cat_ids[normalize_desc(d)] for d in r.not_exhaustive_descs)})
        counters["gt_objects"] += len(r.gt)
        counters["pred_objects"] += len(r.pred)
        counters["pred_invalid_count"] += len(r.pred_invalid)
        for reason in r.pred_invalid:
            counters[f"pred_invalid_{reason}_count"] += 1
        counters["images_without_pred_count"] += int(len(r.pred) == 0)
        counters["images_without_gt_count"] += int(len(r.gt) == 0)
        gt_boxes = [_pixel_box(o, r) for o in r.gt]
        gt_cats = [normalize_desc(o.desc) for o in r.gt]
        for box, cat in zip(gt_boxes, gt_cats):
            xywh = _xywh(box)
            area = xywh[2] * xywh[3]
            counters["gt_degenerate_count"] += int(_is_degenerate(box))
            bucket = "small" if area < _SMALL_MAX else "medium" if area < _MEDIUM_MAX else "large"
            counters[f"gt_{bucket}_count"] += 1
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": img_idx, "category_id": cat_ids[cat],
                            "bbox": xywh, "area": area, "iscrowd": 0})
        pred_boxes = [_pixel_box(o, r) for o in r.pred]
        scores = [1.0 if o.score is None else float(o.score) for o in r.pred]
        maps = mapper.map_many([o.desc for o in r.pred])
        for o, box, score, m in zip(r.pred, pred_boxes, scores, maps):
            counters["pred_default_score_count"] += int(o.score is None)
            counters["pred_degenerate_count"] += int(_is_degenerate(box))
            counters[f"pred_{m.kind}_count"] += 1
            if m.category is None:
                continue  # dropped for AP (counted above); a false positive for F1
            xywh = _xywh(box)
            dt_anns.append({"id": len(dt_anns) + 1, "image_id": img_idx, "category_id": cat_ids[m.category],
                            "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0, "score": score})
        tp = _greedy_f1_counts(list(zip(gt_cats, gt_boxes)),
                               [(m.category, b, s) for m, b, s in zip(maps, pred_boxes, scores) if m.category is not None],
                               f1_iou)
        counters["f1_tp_count"] += tp
        counters["f1_fp_count"] += len(r.pred) - tp  # unmapped predictions are FP too
        counters["f1_fn_count"] += len(r.gt) - tp
        per_image.append({"record": r, "gt_boxes": gt_boxes, "gt_cats": gt_cats, "pred_boxes": pred_boxes,
                          "scores": scores, "maps": maps})
    categories = [{"id": i, "name": n} for n, i in cat_ids.items()]
    return _Prepared(images, categories, gt_anns, dt_anns, counters, per_image)


def _validated(records: Sequence[Mapping | DetectionRecord], coords: str) -> list[DetectionRecord]:
    recs = [to_detection_record(r, coords=coords, where=f"records[{i}]") for i, r in enumerate(records)]
    seen: dict[Any, int] = {}
    for i, r in enumerate(recs):
        key = str(r.image_id)
        if key in seen:
            raise ValueError(
                f"records[{i}]: image_id {r.image_id!r} already used by records[{seen[key]}]; "
                "each image must appear once (merge its gt/pred lists)"
            )
        seen[key] = i
    return recs


def _coco_metrics(prep: _Prepared, backend: str) -> tuple[dict[str, float], dict[str, float]]:
    metrics = _zero_metrics((), [a["area"] for a in prep.gt_anns])
    per_category = {c["name"]: 0.0 for c in prep.categories}
    if prep.gt_anns and prep.dt_anns:
        stats, precision = _run_coco(backend, prep.images, prep.categories, prep.gt_anns, prep.dt_anns)
        for name, v in zip(COCO_METRIC_NAMES, stats):
            # -1 = no GT in this size range (not evaluated); the overall metrics always have GT here.
            metrics[name] = float(v) if v >= 0 else (NOT_EVALUATED if name in AREA_METRICS else 0.0)
        # precision: [T iou, R recall, K cat, A area(all=0), M maxDets(100=last)]
        for c in prep.categories:
            p = precision[:, :, c["id"] - 1, 0, -1]
            valid = p[p > -1]
            per_category[c["name"]] = float(valid.mean()) if valid.size else 0.0
    return metrics, per_category


def evaluate_detection(
    records: Sequence[Mapping | DetectionRecord],
    *,
    iou_type: str = "bbox",
    backend: str = "pycocotools",
    f1_iou: float = 0.5,
    coords: str = "pixel",
    semantic: Any = None,
    metrics: str = "coco",
    f1ish_iou: Sequence[float] = F1ISH_DEFAULT_IOUS,
) -> DetectionReport:
    """COCO (or LVIS) bbox metrics, greedy F1 and F1-ish over GT-vs-prediction records (module docstring).

    Args:
        records: one per image, mapping or :class:`DetectionRecord`; ``image_id`` unique.
        iou_type: only ``"bbox"``.
        backend: ``"pycocotools"`` or ``"faster_coco_eval"`` (optional package).
        f1_iou: IoU threshold of the F1/precision/recall metrics (Rex-Omni style: per
            image and category, predictions greedily by descending score take the unmatched
            GT of highest IoU >= f1_iou; unmapped predictions are false positives).
        coords: default box unit for records without a ``coords`` key: ``"pixel"`` or ``"bins"``.
        semantic: ``eval.semantic`` (``configs.types.SemanticConfig``) or None: exact normalised match only.
        metrics: ``coco`` | ``lvis`` | ``f1ish`` | ``both`` (``eval.f1ish`` is always computed; ``f1ish``
            skips COCO; ``lvis``, also chosen when a record carries ``neg_descs`` /
            ``not_exhaustive_descs``, runs the federated LVIS evaluation instead of COCO).
        f1ish_iou: the F1-ish IoU thresholds (``eval.f1ish.iou_thresholds``).

    An empty prediction set (or no GT at all) gives 0.0 metrics, not an exception; a size-range
    metric (APs/APm/APl/ARs/ARm/ARl) with no GT in its range is ``NOT_EVALUATED`` (-1).
    """
    from eval.semantic import load_encoder

    if iou_type != "bbox":
        raise ValueError(f"iou_type must be 'bbox' (the only type CoordExp predicts), got {iou_type!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if coords not in COORD_MODES:
        raise ValueError(f"coords must be one of {COORD_MODES}, got {coords!r}")
    if metrics not in METRIC_FAMILIES:
        raise ValueError(f"metrics must be one of {METRIC_FAMILIES}, got {metrics!r}")
    if not (0.0 < float(f1_iou) <= 1.0):
        raise ValueError(f"f1_iou must be in (0, 1], got {f1_iou!r}")
    f1_keys = (f"F1@{f1_iou:g}", f"precision@{f1_iou:g}", f"recall@{f1_iou:g}")

    recs = _validated(records, coords)
    lvis = metrics == "lvis" or any(r.lvis for r in recs)
    names = sorted({normalize_desc(d) for r in recs for d in (*(o.desc for o in r.gt), *r.neg_descs,
                                                                *r.not_exhaustive_descs)})
    threshold = float(getattr(semantic, "threshold", 0.6)) if semantic is not None else 0.6
    mapper = CategoryMapper(names, load_encoder(semantic) if semantic is not None else None, threshold)
    prep = _prepare(recs, mapper, float(f1_iou))

    if lvis:
        from eval.lvis_eval import lvis_metrics

        out, per_category = lvis_metrics(prep.images, prep.categories, prep.gt_anns, prep.dt_anns)
    elif metrics == "f1ish":
        out, per_category = {}, {}
    else:
        out, per_category = _coco_metrics(prep, backend)
    tp, fp, fn = (prep.counters[f"f1_{k}_count"] for k in ("tp", "fp", "fn"))
    prec, rec, f1 = precision_recall_f1(tp, tp + fp, tp + fn)
    out.update(zip(f1_keys, (f1, prec, rec)))
    per_image_f1ish, f1ish = _f1ish(prep.per_image, tuple(float(t) for t in f1ish_iou))
    oracle = _oracle_k(recs, prep.per_image, mapper, tuple(float(t) for t in f1ish_iou))
    return DetectionReport(metrics=out, per_category=per_category, counters=prep.counters, backend="lvis" if lvis else backend,
                           f1_iou=float(f1_iou), f1ish=f1ish, oracle_k=oracle, semantic_model=getattr(semantic, "model", None),
                           images=prep.per_image, image_f1ish=per_image_f1ish,
                           coco_gt={"images": prep.images, "categories": prep.categories, "annotations": prep.gt_anns},
                           coco_preds=[{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in prep.dt_anns])


def _oracle_k(recs: Sequence[DetectionRecord], per_image: Sequence[dict], mapper: CategoryMapper,
              thresholds: tuple[float, ...]) -> dict[str, float]:
    """Oracle-K recall and F1 at each threshold (eval.f1ish.oracle_image) over the records' sampled rollouts."""
    ks = {len(r.samples) for r in recs}
    if not ks or ks == {0}:
        return {}
    if len(ks) != 1:
        raise ValueError(f"Oracle-K needs the same number of samples on every record, got {sorted(ks)}")
    rollouts = []  # per image, per sample: (mapped categories, ious[p][g])
    for r, img in zip(recs, per_image):
        rollouts.append([([m.category for m in mapper.map_many([o.desc for o in s])],
                          _ious([_pixel_box(o, r) for o in s], img["gt_boxes"])) for s in r.samples])
    out: dict[str, float] = {"oracle_k_samples": ks.pop()}
    n_gt = sum(len(img["gt_cats"]) for img in per_image)
    for thr in thresholds:
        found, best = 0, []
        for img, samples in zip(per_image, rollouts):
            n, res = oracle_image(img["gt_cats"], samples, thr)
            found += n
            best.append(res)
        out.update(oracle_summarize(found, n_gt, best, thr))
    return out


def _f1ish(per_image: Sequence[dict], thresholds: tuple[float, ...]) -> tuple[list[dict], dict[str, float]]:
    """F1-ish of every image at every threshold and scope (eval.f1ish), and the summaries."""
    rows: list[dict] = [{} for _ in per_image]
    summary: dict[str, float] = {}
    for thr in thresholds:
        for scope in F1ISH_SCOPES:
            prefix = f1ish_key(thr, scope)
            results = []
            for row, img in zip(rows, per_image):
                ious = _ious(img["pred_boxes"], img["gt_boxes"])
                res = image_f1ish(img["gt_cats"], [m.category for m in img["maps"]], ious, thr, scope)
                row[prefix] = res
                results.append(res)
            summary.update(f1ish_summarize(results, prefix))
    return rows, summary


# --------------------------------------------------------------------------- JSONL I/O
def record_to_json(rec: Mapping | DetectionRecord) -> dict[str, Any]:
    """A record as the JSON object written to predictions.jsonl (one line per image)."""
    r = to_detection_record(rec)
    out: dict[str, Any] = {"image_id": r.image_id}
    if r.image is not None:
        out["image"] = r.image
    out.update({"width": r.width, "height": r.height, "coords": r.coords})
    if r.lvis:
        out.update(neg_descs=list(r.neg_descs), not_exhaustive_descs=list(r.not_exhaustive_descs))
    out["gt"] = [{"desc": o.desc, "bbox_2d": list(o.bbox_2d)} for o in r.gt]
    out["pred"] = _objects_json(r.pred)
    if r.samples:
        out["samples"] = [{"pred": _objects_json(s)} for s in r.samples]
    return out


def _objects_json(objs: Sequence[DetectionObject]) -> list[dict[str, Any]]:
    return [{"desc": o.desc, "bbox_2d": list(o.bbox_2d), **({} if o.score is None else {"score": o.score})} for o in objs]


def write_predictions_jsonl(path: str | Path, records: Sequence[Mapping | DetectionRecord], extra: Sequence[Mapping] | None = None) -> Path:
    """Write one JSON line per record; ``extra[i]`` (optional) adds keys such as ``raw_text``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            line = record_to_json(rec)
            if extra is not None:
                for k, v in extra[i].items():
                    line.setdefault(k, v)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


@dataclass
class PredictionsRead:
    """What :func:`read_predictions` kept and skipped (lenient mode only skips)."""

    records: list[dict[str, Any]]
    lines_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # first messages (file:line: ...)


def read_predictions(path: str | Path, *, lenient: bool = False) -> PredictionsRead:
    """Read predictions.jsonl; every line is validated and errors name ``file:line``.

    Strict (default): the first invalid line (not UTF-8, not JSON, a record that fails
    :func:`to_detection_record`: missing image_id/width/height, malformed GT ...) raises
    ``configs.errors.InputError`` (a ``ValueError``) with ``file:line``. ``lenient=True`` skips such lines and counts them
    (``lines_skipped``; the first 20 messages kept). Malformed *predictions* inside a valid line
    are dropped and counted in either mode (``pred_invalid_count``).
    """
    from data.records import iter_utf8_lines

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    out = PredictionsRead(records=[])
    for lineno, line, unreadable in iter_utf8_lines(path):
        if line is not None and not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            if line is None:
                raise ValueError(f"{where}: {unreadable[1]}")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            except RecursionError:
                raise ValueError(f"{where}: JSON nested too deeply to read") from None
            det = to_detection_record(obj, where=where)  # validate now so errors carry file:line
        except ValueError as e:
            if not lenient:  # InputError: the CLIs print it as one line (it is still a ValueError)
                raise InputError(f"{e}; fix the line, or evaluate with --lenient to skip and count such lines") from e
            out.lines_skipped += 1
            if len(out.skipped_examples) < 20:
                out.skipped_examples.append(str(e))
            continue
        if det.pred_invalid:  # keep the count through the dict form the callers evaluate
            obj = {**obj, "pred": [o for o in obj["pred"] if _is_valid_pred(o)], "pred_invalid": list(det.pred_invalid)}
        out.records.append(obj)
    return out


def _is_valid_pred(obj: Any) -> bool:
    try:
        _parse_object(obj, "", is_pred=True)
    except InvalidObject:
        return False
    return True


def read_predictions_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read predictions.jsonl strictly (:func:`read_predictions`); the records as dicts."""
    return read_predictions(path).records


def read_lvis_lists(jsonl: str | Path) -> dict[str, dict[str, list]]:
    """image_id -> the LVIS lists (``data.records.RECORD_METADATA_KEYS``) of a data JSONL's lines that carry them.

    ``data.types.Record`` does not hold them; eval.infer and in-loop eval put them back into
    predictions.jsonl so the federated evaluation sees them. Lines are assumed valid (read_jsonl ran).
    """
    from data.records import iter_utf8_lines

    out: dict[str, dict[str, list]] = {}
    for _, line, _ in iter_utf8_lines(Path(jsonl)):
        if not line or not any(k in line for k in RECORD_METADATA_KEYS):
            continue
        raw = json.loads(line)
        if isinstance(raw, dict) and any(k in raw for k in RECORD_METADATA_KEYS):
            out[str(raw.get("image_id", raw.get("image")))] = {k: list(raw.get(k, [])) for k in RECORD_METADATA_KEYS}
    return out
