"""LVIS federated evaluation through the ``lvis`` package (pinned in requirements.txt; docs/EVAL.md "LVIS").

Called by ``eval.detection.evaluate_detection`` when ``metrics: lvis`` or when the GT records carry
``neg_descs`` / ``not_exhaustive_descs``. Per image, a prediction of a category that is neither in
the image's GT nor in its negative list is ignored; one of a negative category is a false positive;
a false positive of a not-exhaustively-annotated category is not counted; 300 detections per image.

The category frequency groups (``APr``/``APc``/``APf``) follow the LVIS rule (rare: 1-10 images,
common: 11-100, frequent: more) applied to the images of the *evaluated* set.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

LVIS_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
MAX_DETS = 300


def _frequency(n_images: int) -> str:
    return "r" if n_images <= 10 else "c" if n_images <= 100 else "f"


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis 0.5.3 still calls ``np.float`` (removed in numpy 1.24): alias it to ``float`` while it runs."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def lvis_dataset(images: list[dict], categories: list[dict], gt_anns: list[dict]) -> dict:
    """The LVIS GT dict: ``images`` with their neg / not-exhaustive category ids, categories with a frequency."""
    per_cat: dict[int, set] = {c["id"]: set() for c in categories}
    for a in gt_anns:
        per_cat[a["category_id"]].add(a["image_id"])
    cats = [{**c, "frequency": _frequency(len(per_cat[c["id"]])), "image_count": len(per_cat[c["id"]])}
            for c in categories]
    return {"images": images, "categories": cats, "annotations": gt_anns}


def lvis_metrics(images: list[dict], categories: list[dict], gt_anns: list[dict], dt_anns: list[dict]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """LVIS AP (``LVIS_METRIC_NAMES``; -1 where a group has no category) and per-category AP (IoU .50:.95)."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError as e:  # pragma: no cover - lvis is in requirements.txt
        raise ImportError("LVIS evaluation needs the lvis package: pip install lvis==0.5.3 (requirements.txt)") from e
    metrics = {k: 0.0 for k in LVIS_METRIC_NAMES}
    per_category = {c["name"]: 0.0 for c in categories}
    if not gt_anns or not dt_anns:
        return metrics, per_category
    results = [{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in dt_anns]
    logging.getLogger("lvis").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
        path = Path(tmp) / "lvis_gt.json"  # the lvis package reads its GT from a file
        path.write_text(json.dumps(lvis_dataset(images, categories, gt_anns)), encoding="utf-8")
        gt = LVIS(str(path))
        ev = LVISEval(gt, LVISResults(gt, results, max_dets=MAX_DETS), iou_type="bbox")
        ev.run()
    res = ev.get_results()
    metrics = {k: float(res[k]) for k in LVIS_METRIC_NAMES}
    precision = ev.eval["precision"]  # [T, R, K, A]
    for k, cid in enumerate(ev.params.cat_ids):
        p = precision[:, :, k, 0]
        valid = p[p > -1]
        per_category[next(c["name"] for c in categories if c["id"] == cid)] = float(valid.mean()) if valid.size else 0.0
    return metrics, per_category
