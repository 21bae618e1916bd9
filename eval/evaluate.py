"""Offline evaluator: predictions.jsonl -> COCO / LVIS / F1-ish report (same helper as the in-loop eval).

    python -m eval.evaluate --predictions runs/x/eval/step_100/predictions.jsonl [--out metrics.json] [--lenient]
        [--semantic-model NAME_OR_PATH --semantic-threshold 0.6] [--metrics coco|lvis|f1ish|both]

Prints the metrics, the counters and a per-category AP table; writes the full report
as JSON when ``--out`` is given, and the artifacts (``eval.artifacts``) next to it or in ``--out-dir``. Strict by default: an invalid line stops with ``file:line``;
``--lenient`` skips such lines and counts them (``lines_skipped_count``). A malformed
prediction inside a valid line is always dropped and counted (``pred_invalid_count``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from configs.errors import add_debug_flag, run_cli
from configs.types import F1ishConfig
from eval.artifacts import write_artifacts
from eval.detection import (
    AREA_METRICS,
    BACKENDS,
    COORD_MODES,
    F1ISH_DEFAULT_IOUS,
    METRIC_FAMILIES,
    NOT_EVALUATED,
    DetectionReport,
    evaluate_detection,
    read_predictions,
)
from eval.semantic import add_semantic_args, load_encoder, semantic_from_args


def evaluate_file(
    predictions: str | Path, *, backend: str = "pycocotools", f1_iou: float = 0.5, coords: str = "pixel",
    lenient: bool = False, semantic: Any = None, metrics: str = "coco", f1ish_iou: Sequence[float] = F1ISH_DEFAULT_IOUS,
) -> DetectionReport:
    """Read a predictions.jsonl and run :func:`eval.detection.evaluate_detection` on it.

    ``lenient``: skip invalid lines (counted in ``counters["lines_skipped_count"]``, the first
    messages printed to stderr) instead of raising with ``file:line``. ``semantic``: ``eval.semantic``
    (a ``configs.types.SemanticConfig``); its encoder is loaded before the file is read.
    """
    load_encoder(semantic)  # a missing package / model fails now, not after reading the file
    read = read_predictions(predictions, lenient=lenient)
    for message in read.skipped_examples:
        print(f"skipped: {message}", file=sys.stderr)
    report = evaluate_detection(read.records, backend=backend, f1_iou=f1_iou, coords=coords, semantic=semantic,
                                metrics=metrics, f1ish_iou=f1ish_iou)
    report.counters["lines_skipped_count"] = read.lines_skipped
    return report


def write_metrics_json(path: str | Path, report: DetectionReport, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``report`` (metrics, per_category, counters, backend, f1_iou) plus ``extra`` keys as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = report.to_dict()
    if extra:
        payload.update(extra)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def format_report(report: DetectionReport) -> str:
    """Human-readable report: metrics, counters, per-category AP (descending)."""
    lines = ["metrics:"]
    for k, v in report.metrics.items():
        note = f"  (not evaluated: no {AREA_METRICS[k]} GT)" if k in AREA_METRICS and v == NOT_EVALUATED else ""
        lines.append(f"  {k:<14} {v:.4f}{note}")
    lines.append("counters:")
    for k, v in report.counters.items():
        lines.append(f"  {k:<26} {v}")
    for k, v in report.f1ish.items():
        if k.endswith(("_micro_f1", "_macro_f1", "_tp", "_fp", "_fn", "_pred_ignored")):
            lines.append(f"  {k:<34} {v:.4f}" if isinstance(v, float) else f"  {k:<34} {v}")
    for k, v in report.oracle_k.items():
        lines.append(f"  {k:<34} {v:.4f}" if isinstance(v, float) else f"  {k:<34} {v}")
    if report.per_category:
        width = max(8, max(len(n) for n in report.per_category))
        lines.append(f"per-category AP ({len(report.per_category)} categories):")
        lines.append(f"  {'category':<{width}}  AP")
        for name, ap in sorted(report.per_category.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {name:<{width}}  {ap:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--predictions", required=True, help="predictions.jsonl (one record per image)")
    p.add_argument("--out", default=None, help="write the full report as JSON here")
    p.add_argument("--backend", default="pycocotools", choices=BACKENDS)
    p.add_argument("--f1-iou", type=float, default=0.5, help="IoU threshold of F1/precision/recall (default 0.5)")
    p.add_argument("--coords", default="pixel", choices=COORD_MODES, help="box unit of records without a 'coords' key")
    p.add_argument("--out-dir", default=None, help="write metrics.json and the artifacts (per_image.json, matches.jsonl, "
                   "per_class.csv, coco_gt.json, coco_preds.json) here (default: next to --out)")
    p.add_argument("--metrics", default="coco", choices=METRIC_FAMILIES,
                   help="coco | lvis (federated; automatic when the GT carries neg_descs) | f1ish | both")
    add_semantic_args(p)
    p.add_argument("--f1ish-iou", type=float, nargs="+", default=list(F1ishConfig.iou_thresholds),
                   help="F1-ish IoU thresholds (default 0.3 0.5)")
    p.add_argument("--f1ish-primary-iou", type=float, default=F1ishConfig.primary_iou,
                   help="threshold of matches.jsonl / per_class.csv (one of --f1ish-iou)")
    p.add_argument("--lenient", action="store_true",
                   help="skip invalid lines and count them (lines_skipped_count) instead of stopping at the first with file:line")
    return add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    semantic = semantic_from_args(args)
    F1ishConfig(iou_thresholds=tuple(args.f1ish_iou), primary_iou=args.f1ish_primary_iou)
    report = evaluate_file(args.predictions, backend=args.backend, f1_iou=args.f1_iou, coords=args.coords,
                           lenient=args.lenient, semantic=semantic, metrics=args.metrics, f1ish_iou=args.f1ish_iou)
    print(format_report(report))
    out = Path(args.out) if args.out else (Path(args.out_dir) / "metrics.json" if args.out_dir else None)
    if out is not None:
        path = write_metrics_json(out, report, extra={"predictions": str(args.predictions)})
        print(f"wrote {path}")
        paths = write_artifacts(Path(args.out_dir) if args.out_dir else out.parent, report,
                                primary_iou=args.f1ish_primary_iou)
        print(f"wrote {', '.join(p.name for p in paths)} in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
