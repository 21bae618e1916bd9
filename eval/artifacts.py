"""Evaluation artifacts next to metrics.json (docs/EVAL.md "Artifacts").

``write_artifacts(out_dir, report, primary_iou, max_images)`` writes, from one
:class:`eval.detection.DetectionReport`:

- ``per_image.json``: per image its counts and F1-ish (every threshold and scope);
- ``matches.jsonl``: per image the F1-ish location pairs at ``primary_iou``, scope ``full`` (IoU, both
  descs, the prediction's mapped category, how it was mapped and its similarity, whether the descs agree)
  and the unmatched predictions / GT;
- ``per_class.csv``: per category GT and mapped-prediction counts, AP, and F1-ish TP/FP/FN at ``primary_iou``
  (scope ``full``; an FP is charged to the prediction's category, unmapped ones to ``<unmapped>``);
- ``coco_gt.json`` / ``coco_preds.json``: the COCO GT set and results list that were evaluated.

``max_images`` bounds ``per_image.json`` and ``matches.jsonl`` (the first N images; in-loop eval uses
``eval.artifacts_max_images``); None writes every image.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from eval.f1ish import key_prefix

ARTIFACT_FILES = ("per_image.json", "matches.jsonl", "per_class.csv", "coco_gt.json", "coco_preds.json")
UNMAPPED_CLASS = "<unmapped>"


def _per_image(report: Any, n: int) -> dict[str, Any]:
    rows = []
    for img, f1 in zip(report.images[:n], report.image_f1ish[:n]):
        r = img["record"]
        scores = {}
        for prefix, res in f1.items():
            p, rc, f = res.prf()
            scores[prefix] = {"tp": res.tp, "fp": res.fp, "fn": res.fn, "pred_ignored": res.pred_ignored,
                              "precision": p, "recall": rc, "f1": f}
        rows.append({"image_id": r.image_id, "gt": len(r.gt), "pred": len(r.pred),
                     "pred_unmapped": sum(m.category is None for m in img["maps"]), "f1ish": scores})
    return {"images_total": len(report.images), "images_written": len(rows), "images": rows}


def _matches_line(img: dict, res: Any, thr: float) -> dict[str, Any]:
    r = img["record"]
    pairs = []
    for p, g, iou, ok in res.pairs:
        m = img["maps"][p]
        pairs.append({"pred_index": p, "gt_index": g, "iou": iou, "pred_desc": r.pred[p].desc, "gt_desc": r.gt[g].desc,
                      "pred_category": m.category, "mapping": m.kind, "similarity": m.similarity, "desc_match": ok})
    used_p = {p for p, *_ in res.pairs}
    used_g = {g for _, g, *_ in res.pairs}
    return {"image_id": r.image_id, "iou_threshold": thr, "scope": "full", "matches": pairs,
            "unmatched_pred": [p for p in range(len(r.pred)) if p not in used_p],
            "unmatched_gt": [g for g in range(len(r.gt)) if g not in used_g]}


def _per_class_rows(report: Any, prefix: str) -> list[list[Any]]:
    gt_n, pred_n, tp, fp, fn = Counter(), Counter(), Counter(), Counter(), Counter()
    for img, f1 in zip(report.images, report.image_f1ish):
        res = f1[prefix]
        gt_n.update(img["gt_cats"])
        pred_n.update(m.category for m in img["maps"] if m.category is not None)
        ok_p = {p for p, _, _, ok in res.pairs if ok}
        ok_g = {g for _, g, _, ok in res.pairs if ok}
        tp.update(img["gt_cats"][g] for g in ok_g)
        fn.update(c for g, c in enumerate(img["gt_cats"]) if g not in ok_g)
        fp.update(m.category or UNMAPPED_CLASS for p, m in enumerate(img["maps"]) if p not in ok_p)
    names = [c["name"] for c in report.coco_gt.get("categories", [])]
    if fp[UNMAPPED_CLASS]:
        names.append(UNMAPPED_CLASS)
    return [[n, gt_n[n], pred_n[n], report.per_category.get(n, ""), tp[n], fp[n], fn[n]] for n in names]


def write_artifacts(out_dir: str | Path, report: Any, *, primary_iou: float = 0.5, max_images: int | None = None
                    ) -> list[Path]:
    """Write the :data:`ARTIFACT_FILES` of ``report`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = key_prefix(primary_iou, "full")
    if report.image_f1ish and prefix not in report.image_f1ish[0]:
        raise ValueError(f"eval.f1ish.primary_iou={primary_iou:g} is not one of eval.f1ish.iou_thresholds "
                         f"({sorted({k.split('@')[1].split('_')[0] for k in report.image_f1ish[0]})})")
    n = len(report.images) if max_images is None else min(int(max_images), len(report.images))
    paths = [out / name for name in ARTIFACT_FILES]
    paths[0].write_text(json.dumps(_per_image(report, n), indent=1) + "\n", encoding="utf-8")
    with paths[1].open("w", encoding="utf-8") as f:
        for img, f1 in zip(report.images[:n], report.image_f1ish[:n]):
            f.write(json.dumps(_matches_line(img, f1[prefix], primary_iou), ensure_ascii=False) + "\n")
    with paths[2].open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "gt", "pred", "AP", f"{prefix}_tp", f"{prefix}_fp", f"{prefix}_fn"])
        w.writerows(_per_class_rows(report, prefix))
    paths[3].write_text(json.dumps(report.coco_gt) + "\n", encoding="utf-8")
    paths[4].write_text(json.dumps(report.coco_preds) + "\n", encoding="utf-8")
    return paths

