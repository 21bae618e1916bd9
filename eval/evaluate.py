"""Offline evaluator: predictions.jsonl -> COCO report (same helper as the in-loop eval).

    python -m eval.evaluate --predictions runs/x/eval/step_100/predictions.jsonl [--out metrics.json] [--lenient]

Prints the metrics, the counters and a per-category AP table; writes the full report
as JSON when ``--out`` is given. Strict by default: an invalid line stops with ``file:line``;
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
from eval.detection import (
    AREA_METRICS,
    BACKENDS,
    COORD_MODES,
    NOT_EVALUATED,
    DetectionReport,
    evaluate_detection,
    read_predictions,
)


def evaluate_file(
    predictions: str | Path, *, backend: str = "pycocotools", f1_iou: float = 0.5, coords: str = "pixel",
    lenient: bool = False,
) -> DetectionReport:
    """Read a predictions.jsonl and run :func:`eval.detection.evaluate_detection` on it.

    ``lenient``: skip invalid lines (counted in ``counters["lines_skipped_count"]``, the first
    messages printed to stderr) instead of raising with ``file:line``.
    """
    read = read_predictions(predictions, lenient=lenient)
    for message in read.skipped_examples:
        print(f"skipped: {message}", file=sys.stderr)
    report = evaluate_detection(read.records, backend=backend, f1_iou=f1_iou, coords=coords)
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
    p.add_argument("--lenient", action="store_true",
                   help="skip invalid lines and count them (lines_skipped_count) instead of stopping at the first with file:line")
    return add_debug_flag(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = evaluate_file(args.predictions, backend=args.backend, f1_iou=args.f1_iou, coords=args.coords,
                           lenient=args.lenient)
    print(format_report(report))
    if args.out:
        path = write_metrics_json(args.out, report, extra={"predictions": str(args.predictions)})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
