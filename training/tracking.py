"""Experiment tracking: ``metrics.jsonl`` always, wandb when asked (``run.tracker``).

Only the main process writes; on other ranks every method is a no-op, so the
trainer can call them unconditionally.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from configs.errors import InputError, UserError
from core.vocab import LOGGER_NAME
from training.setup import METRICS_FILE

logger = logging.getLogger(LOGGER_NAME)

MEDIA_IMAGES = 8  # eval images sent to wandb per in-loop eval
# wandb.init argument -> environment variable that overrides the config's value (wandb's own names).
# The wandb files themselves always live under the run dir (WANDB_DIR is not used): `wandb sync <run dir>/wandb`.
WANDB_ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "name": "WANDB_NAME",
             "id": "WANDB_RUN_ID"}


def wandb_settings(**from_config: Any) -> dict[str, Any]:
    """``wandb.init`` keyword arguments: the config's values, each replaced by its ``WANDB_*`` variable when set."""
    return {key: os.environ.get(WANDB_ENV[key]) or value for key, value in from_config.items()}


def _scalar(key: str, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got shape {tuple(value.shape)}")
        return float(value.detach().float().cpu().item())
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from None


class Tracker:
    """One run's metric sink.

    ``metrics.jsonl`` gets one line per :meth:`log` call, ``{"step": N, **metrics}``
    with keys sorted; it is opened in append mode, so a resumed run continues
    the same file (lines of steps after the resume point are not removed).
    Non-finite floats are written as ``NaN`` / ``Infinity`` (Python's json
    reads them; the value is never dropped).

    ``backend="wandb"`` imports wandb here (only then) and writes under ``run_dir``. The
    ``WANDB_*`` environment variables win over the config (:data:`WANDB_ENV`): ``WANDB_MODE=offline``
    runs offline whatever ``run.tracker.mode`` says, as wandb's own tools expect. The wandb run id
    is kept in ``run_dir/wandb_run_id`` so a resumed run logs into the same wandb run. A failing
    ``wandb.init`` (no API key, no network) is a user error whose message says how to fix it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        backend: str = "none",
        mode: str = "offline",
        project: str = "coordexp",
        entity: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        is_main_process: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.is_main_process = is_main_process
        self.metrics_path = self.run_dir / METRICS_FILE
        self.config_path = self.run_dir / "tracker_config.json"
        self._config: dict[str, Any] = {}
        self._file = None
        self._wandb_run = None
        if not is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # closed in finish()
        if backend == "wandb":
            try:
                import wandb
            except ImportError as exc:
                raise ImportError(
                    "run.tracker.backend: wandb needs `pip install wandb` (or set backend: none)"
                ) from exc
            # One wandb run per run dir: a resumed training run continues the same wandb run.
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
            settings = wandb_settings(mode=mode, project=project, entity=entity, name=run_name, id=run_id)
            try:
                self._wandb_run = wandb.init(config=dict(config or {}), tags=list(tags), resume="allow",
                                             dir=str(self.run_dir), **settings)
            except Exception as exc:  # noqa: BLE001 - wandb raises many types; all mean "fix the wandb set-up"
                first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                raise UserError(
                    f"run.tracker: wandb.init (mode {settings['mode']}) failed: {first}. Log in (`wandb login` or "
                    "WANDB_API_KEY=...), or run without the network: WANDB_MODE=offline, "
                    "--set run.tracker.mode=offline, or --set run.tracker.backend=none"
                ) from exc
            id_file.write_text(self._wandb_run.id + "\n")
        if config:
            self.log_config(config)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one optimizer step's metrics (``step`` is the 1-based count of optimizer steps done)."""
        if not self.is_main_process:
            return
        if self._file is None:
            raise RuntimeError("Tracker.log after finish()")
        if "step" in metrics:
            raise ValueError("metric key 'step' is reserved for the optimizer step in metrics.jsonl")
        row = {key: _scalar(key, value) for key, value in metrics.items()}
        line = {"step": int(step), **dict(sorted(row.items()))}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(row, step=int(step))

    def log_eval_media(self, step: int, predictions_path: str | Path, max_images: int = MEDIA_IMAGES) -> None:
        """wandb only: the first ``max_images`` eval images with GT (green) and predicted (red) boxes, drawn
        as ``eval/visualize.py`` draws them, under ``eval/images``, and every prediction in a
        ``wandb.Table`` under ``eval/predictions`` (image id, image, raw text, parsed objects, mean score,
        matched IoU, parse validity). A no-op without wandb; a missing image file draws a grey canvas."""
        if not self.is_main_process or self._wandb_run is None:
            return
        import wandb

        from eval.detection import read_predictions_jsonl
        from eval.visualize import render_record

        path = Path(predictions_path)
        records = read_predictions_jsonl(path)
        root = path.parent
        columns = ["image_id", "image", "raw_text", "objects", "n_pred", "n_gt", "mean_score", "matched_iou",
                   "parse_valid"]
        table = wandb.Table(columns=columns)
        images = []
        for i, rec in enumerate(records):
            picture = wandb.Image(render_record(rec, root, cell_size=256, blank_missing=True),
                                  caption=str(rec["image_id"])) if i < max_images else None
            if picture is not None:
                images.append(picture)
            pred = rec.get("pred") or []
            scores = [float(o["score"]) for o in pred if o.get("score") is not None]
            table.add_data(str(rec["image_id"]), picture, rec.get("raw_text", ""),
                           json.dumps([{"desc": o["desc"], "bbox_2d": o["bbox_2d"]} for o in pred]),
                           len(pred), len(rec.get("gt") or []),
                           sum(scores) / len(scores) if scores else None, rec.get("matched_iou_mean"),
                           rec.get("parse_valid"))
        self._wandb_run.log({"eval/images": images, "eval/predictions": table}, step=int(step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Merge ``config`` (e.g. the resolved config, pipeline identity) into ``tracker_config.json`` and wandb."""
        if not self.is_main_process:
            return
        self._config.update(config)
        self.config_path.write_text(json.dumps(self._config, indent=2, sort_keys=True, default=str) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.config.update(dict(config), allow_val_change=True)

    def finish(self) -> None:
        """Close the file and the wandb run; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse ``metrics.jsonl`` (for plots and tests); a bad line raises with file:line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: not valid JSON ({exc})") from None
    return rows


def truncate_metrics_after(path: str | Path, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` logged after optimizer step ``step``; return how many.

    A run resumed from ``checkpoint-<step>`` re-logs the steps after it; lines that an interrupted
    run wrote past its last checkpoint would otherwise appear twice. The resume point is the end of
    the last readable line with a step <= ``step``: every line after it is dropped whatever it
    holds (a line torn by a kill or a full disk included). An unreadable line before it is dropped
    with a warning naming ``file:line``, and missing steps up to ``step`` are warned about; the run
    goes on either way.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    entries: list[tuple[int, dict[str, Any] | None]] = []  # (line number, row or None when unreadable)
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            entries.append((lineno, row if isinstance(row, dict) and isinstance(row.get("step"), int) else None))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entries.append((lineno, None))
    cut = max((i + 1 for i, (_, row) in enumerate(entries) if row is not None and row["step"] <= step), default=0)
    keep = []
    for lineno, row in entries[:cut]:
        if row is None:
            logger.warning("%s:%d: not a metrics row (torn or corrupted line), dropped", path, lineno)
        elif row["step"] <= step:
            keep.append(row)
    last = max((row["step"] for row in keep), default=0)
    if last < step:
        logger.warning("%s: no line for step(s) %d-%d before the resume point (lost by the interrupted run)",
                       path, last + 1, step)
    dropped = len(entries) - cut
    if len(keep) != len(entries):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep), encoding="utf-8")
        tmp.replace(path)
    return dropped
