"""In-loop rollout evaluation (docs/EVAL.md): greedy rollouts on the validation set -> ``eval/rollout/*``.

Used by Stage-1 and both Stage-2 trainers every ``training.eval_every`` steps and at the end::

    metrics = run_rollout_eval(unwrapped_model, tokenizer, coord_vocab, encoder, val_records,
                               backend_kwargs={...}, matching=cfg.rollout_matching.matching,
                               eval_detection=cfg.rollout_matching.eval_detection,
                               out_dir=run_dir / "eval" / f"step_{step}", accelerator=accelerator)

Per image: generate (greedy) -> ``rollout.parser.parse_rollout`` -> ``rollout.matching.hungarian_match``
(bin-space IoU, same gate as Channel-B) -> counts; predictions get a confidence from
``eval.scores.score_objects`` and go, with the GT, into ``eval.detection.evaluate_detection`` for
``eval/rollout/mAP``. Under DDP every rank generates for ``records[rank::world_size]``; the
per-image results are gathered to every rank (de-duplicated by index) and COCO runs on the main
process only, whose mAP is broadcast so all ranks return the same payload.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configs.types import EvalConfig, EvalDetectionConfig, MatchingConfig
from core.vocab import LOGGER_NAME
from data.records import bins_to_pixels
from data.types import Record
from eval.artifacts import write_artifacts
from eval.detection import DetectionReport, evaluate_detection, write_predictions_jsonl
from eval.evaluate import write_metrics_json
from eval.scores import score_objects
from rollout.metrics import precision_recall_f1, rollout_counters
from rollout.types import GenerationOutput, MatchResult, ParsedRollout

logger = logging.getLogger(LOGGER_NAME)  # the project logger: its warnings reach train.log

PREFIX = "eval/rollout/"


# the declared defaults (configs/types.py) of the config sections these functions take
_MATCHING, _DETECTION, _EVAL = MatchingConfig(), EvalDetectionConfig(), EvalConfig()


@dataclass
class SampleResult:
    """What one validation image contributes (picklable, gathered across ranks).

    gt / pred: detection-record objects in **pixels** (pred with ``score``); ``counters``: this
    image's ``rollout.metrics.rollout_counters`` (the Channel-B conventions: Hungarian matching
    in bin space, parse validity, drop reasons) restricted to its summable keys.
    """

    index: int
    image_id: str
    image: str
    width: int
    height: int
    gt: list[dict]
    pred: list[dict]
    raw_text: str
    parse_valid: bool
    finished: bool
    matched_iou_sum: float
    counters: dict[str, float] = field(default_factory=dict)
    samples: list[list[dict]] = field(default_factory=list)  # Oracle-K: the valid predictions of K sampled rollouts
    lvis: dict[str, list] = field(default_factory=dict)  # the record's LVIS lists (neg_descs, not_exhaustive_descs)

    def detection_record(self) -> dict[str, Any]:
        out = {"image_id": self.image_id, "image": self.image, "width": self.width, "height": self.height,
               "coords": "pixel", "gt": self.gt, "pred": self.pred}  # fmt: skip
        out.update(self.lvis)
        if self.samples:
            out["samples"] = [{"pred": p} for p in self.samples]
        return out

    def extra(self) -> dict[str, Any]:
        """Debug keys written beside each predictions.jsonl line (ignored by the evaluator)."""
        drops = {k[len("rollout/drop_") : -len("_count")]: int(v) for k, v in self.counters.items()
                 if k.startswith("rollout/drop_") and v}  # fmt: skip
        matched = self.counters.get("rollout/matched_total", 0.0)
        return {"raw_text": self.raw_text, "parse_valid": self.parse_valid, "finished": self.finished,
                "drop_reasons": drops,
                "matched_iou_mean": self.matched_iou_sum / matched if matched else None}  # fmt: skip


_SUMMABLE = ("_total", "_count", "_num", "_den")


def sample_result(
    index: int,
    record: Record,
    generation: GenerationOutput,
    parsed: ParsedRollout,
    match: MatchResult,
    *,
    score_mode: str = "token_prob",
    score_include_desc: bool = False,
) -> SampleResult:
    """Combine one image's generation (``rollout.types.GenerationOutput``), parse (``ParsedRollout``)
    and match (``MatchResult``) into a :class:`SampleResult` (boxes converted bins -> pixels)."""
    valid = parsed.valid_objects
    scores = score_objects(valid, generation.token_logprobs, mode=score_mode, include_desc=score_include_desc)
    pred = [
        {"desc": o.desc, "bbox_2d": list(bins_to_pixels(o.bins, record.width, record.height)), "score": s}
        for o, s in zip(valid, scores, strict=True)
    ]
    gt = [{"desc": o.desc, "bbox_2d": list(bins_to_pixels(o.bins, record.width, record.height))} for o in record.objects]
    counters = rollout_counters([parsed], [match], [len(record.objects)])
    return SampleResult(
        index=index,
        image_id=record.image_id,
        image=record.image_path,
        width=record.width,
        height=record.height,
        gt=gt,
        pred=pred,
        raw_text=parsed.text,
        parse_valid=bool(parsed.parse_valid),
        finished=bool(generation.finished),
        matched_iou_sum=float(sum(match.ious)),
        counters={k: float(v) for k, v in counters.items() if k.endswith(_SUMMABLE)},
    )


def rollout_metrics(results: Sequence[SampleResult]) -> dict[str, float]:
    """The ``eval/rollout/*`` payload without COCO, over all images.

    Counters (``*_total``, ``*_count``) are sums of the per-image ``rollout_counters``; the rates
    are re-derived from the sums exactly as the training aggregator does for ``rollout/*``:
    precision = matched / valid predictions, recall = matched / GT, f1 = 2·matched / (valid + GT),
    parse_valid_rate = parse-valid images / images (0 when a denominator is 0). Extra eval-only
    keys: ``samples_total``, ``finished_rate`` (the answer ended with ``<|im_end|>`` within
    ``max_new_tokens``), ``matched_iou_mean`` (bin-space IoU of matched pairs).
    """
    # Start from the zero counters of an empty batch so the key set never depends on the data.
    sums = {k: 0.0 for k in rollout_counters([], [], []) if k.endswith(_SUMMABLE)}
    for r in results:
        for k, v in r.counters.items():
            sums[k] = sums.get(k, 0.0) + v
    n = len(results)
    matched = sums.get("rollout/matched_total", 0.0)
    valid = sums.get("rollout/valid_pred_objects_total", 0.0)
    gt = sums.get("rollout/gt_objects_total", 0.0)
    out: dict[str, float] = {}
    for k, v in sorted(sums.items()):
        name = k[len("rollout/") :]
        # Internal reduction helpers never reach the log.
        if name.startswith("_"):
            continue
        out[PREFIX + name] = float(v)
    precision, recall, f1 = precision_recall_f1(matched, valid, gt)
    out.update({
        PREFIX + "precision": precision,
        PREFIX + "recall": recall,
        PREFIX + "f1": f1,
        PREFIX + "parse_valid_rate": sum(r.parse_valid for r in results) / n if n else 0.0,
        PREFIX + "gt_per_sample": gt / n if n else 0.0,
        PREFIX + "pred_per_sample": valid / n if n else 0.0,
        PREFIX + "finished_rate": sum(r.finished for r in results) / n if n else 0.0,
        PREFIX + "matched_iou_mean": sum(r.matched_iou_sum for r in results) / matched if matched else 0.0,
        PREFIX + "samples_total": float(n),
    })  # fmt: skip
    return out


# ------------------------------------------------------------------ generation
def predict_records(
    model,
    tokenizer,
    coord_vocab,
    encoder,
    records: Sequence[Record],
    *,
    indices: Sequence[int] | None = None,
    backend=None,
    backend_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    matching: MatchingConfig = _MATCHING,
    score_mode: str = "token_prob",
    score_include_desc: bool = False,
    progress: bool = False,
) -> list[SampleResult]:
    """Greedy rollouts + parse + match for ``records[i] for i in indices`` (default: all).

    ``backend``: a ready ``rollout.backends.GenerationBackend`` (``generate(prompts) ->
    list[GenerationOutput]``); when None, ``HFGenerationBackend(model, tokenizer, **backend_kwargs)``
    (``max_new_tokens`` required; temperature 0 = greedy).
    ``batch_size``: prompts encoded and handed to the backend at once (default: the backend's).
    ``matching``: ``rollout_matching.matching``; its desc gate (a Stage-2 training rule) is not applied.
    """
    from rollout.matching import hungarian_match
    from rollout.parser import parse_rollout

    if backend is None:
        from rollout.backends import HFGenerationBackend

        kwargs = dict(backend_kwargs or {})
        if "max_new_tokens" not in kwargs:
            raise ValueError(
                "rollout eval backend_kwargs needs max_new_tokens (rollout_matching.decoding.max_new_tokens); "
                f"got keys {sorted(kwargs)}"
            )
        backend = HFGenerationBackend(model, tokenizer, **kwargs)
    if batch_size is None:
        batch_size = int(getattr(backend, "batch_size", 8))
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
    matching = matching.for_eval()  # eval matches boxes; the desc gate belongs to Stage-2 training
    indices = list(range(len(records))) if indices is None else list(indices)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        # disable=None: drawn on a terminal only (a log file would collect carriage-return frames)
        bar = tqdm(total=len(indices), desc="generate", unit="img", disable=None)
    results: list[SampleResult] = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts = [encoder.encode_prompt(records[i]) for i in chunk]
            outputs = backend.generate(prompts)
            if len(outputs) != len(chunk):
                raise RuntimeError(f"generation backend returned {len(outputs)} outputs for {len(chunk)} prompts")
            for i, gen in zip(chunk, outputs):
                rec = records[i]
                parsed = parse_rollout(gen.token_ids, tokenizer, coord_vocab)
                match = hungarian_match(parsed.pred_bins, [o.bins for o in rec.objects], matching)
                results.append(
                    sample_result(i, rec, gen, parsed, match, score_mode=score_mode, score_include_desc=score_include_desc)
                )
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return results


def add_sampled_rollouts(results: Sequence[SampleResult], model, tokenizer, coord_vocab, encoder,
                         records: Sequence[Record], *, backend, num_samples: int, temperature: float, seed: int,
                         **kwargs: Any) -> None:
    """Oracle-K: ``num_samples`` sampled rollouts of each result's record, stored in ``result.samples``.

    Rollout ``k`` generates with ``backend.derive(temperature=temperature)`` whose generator is seeded
    with ``seed + k`` first, so the same seed, records and batch size give the same rollouts.
    ``kwargs``: :func:`predict_records`'s (``batch_size``, ``matching``, ``score_mode`` ...).
    """
    if num_samples < 1 or not temperature > 0:
        raise ValueError(f"Oracle-K needs num_samples >= 1 and temperature > 0, got {num_samples}, {temperature}")
    sampler = backend.derive(temperature=float(temperature), batch_size=getattr(backend, "batch_size", 8))
    indices = [r.index for r in results]
    for k in range(num_samples):
        sampler.generator.manual_seed(int(seed) + k)
        sampled = predict_records(model, tokenizer, coord_vocab, encoder, records, indices=indices, backend=sampler,
                                  **kwargs)
        for res, smp in zip(results, sampled, strict=True):
            res.samples.append(smp.pred)


# ------------------------------------------------------------------ distributed
def _gather_object(items: list) -> list:
    """All ranks' lists concatenated (every rank receives everything)."""
    from accelerate.utils import gather_object

    return gather_object(items)


def _broadcast_object(value: Any) -> Any:
    """The main process's ``value`` on every rank."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _world(accelerator) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return int(accelerator.process_index), int(accelerator.num_processes), bool(accelerator.is_main_process)


def gather_results(local: Sequence[SampleResult], num_records: int, accelerator=None) -> list[SampleResult]:
    """Every rank's results in dataset order, each index once (gathers may pad with duplicates)."""
    _, world, _ = _world(accelerator)
    items = list(local) if world == 1 else _gather_object(list(local))
    by_index: dict[int, SampleResult] = {}
    for r in items:
        by_index.setdefault(r.index, r)
    missing = sorted(set(range(num_records)) - set(by_index))
    if missing:
        raise RuntimeError(
            f"rollout eval lost {len(missing)} of {num_records} images in the gather (first: {missing[:5]}); "
            "every rank must evaluate records[rank::world_size]"
        )
    return [by_index[i] for i in range(num_records)]


# ------------------------------------------------------------------ entry point
def run_rollout_eval(
    model,
    tokenizer,
    coord_vocab,
    encoder,
    records: Sequence[Record],
    *,
    backend_kwargs: Mapping[str, Any] | None = None,
    matching: MatchingConfig = _MATCHING,
    eval_detection: EvalDetectionConfig = _DETECTION,
    out_dir: str | Path | None = None,
    accelerator=None,
    batch_size: int | None = None,
    backend=None,
    step: int | None = None,
    progress: bool = False,
    eval_cfg: EvalConfig = _EVAL,
    lvis_lists: Mapping[str, Mapping[str, list]] | None = None,
) -> dict[str, float]:
    """Greedy rollout eval of ``records``; returns the ``eval/rollout/*`` payload (same on every rank).

    model:          the unwrapped Qwen3-VL (``accelerator.unwrap_model``); put in eval mode for the
                    call and restored afterwards
    encoder:        ``data.encoding.ChatEncoder`` (``encode_prompt`` builds the generation prompts)
    backend_kwargs: ``rollout.backends.HFGenerationBackend(**backend_kwargs)`` (greedy decoding)
    matching:       ``rollout_matching.matching``
    eval_detection: ``rollout_matching.eval_detection`` (``enabled``, ``score_mode``, ``score_include_desc``, ``metrics``)
    out_dir:        ``<run_dir>/eval/step_<N>``; receives predictions.jsonl and metrics.json (main process)
    step:           the optimizer step evaluated (written into metrics.json and the summary line)
    progress:       a generation progress bar on the main process (drawn on a terminal only)
    lvis_lists:     image_id -> LVIS lists (``eval.detection.read_lvis_lists`` of the val JSONL): such records get
                    the federated LVIS evaluation, and predictions.jsonl keeps the lists
    eval_cfg:       ``cfg.eval`` (``semantic``, ``f1ish``, ``oracle``, ``artifacts_max_images``)
    (defaults: the declared ones, configs/types.py)

    The main process logs one summary line (:func:`summary_line`: mAP, AP50, F1, parse-valid rate).

    ``eval/rollout/mAP`` (COCO AP .50:.95) is present iff detection eval is enabled and is always a
    float: any exception inside the COCO evaluation logs a warning and gives 0.0.
    """
    enabled, metrics_kind = eval_detection.enabled, eval_detection.metrics
    f1ish_iou, primary_iou = tuple(eval_cfg.f1ish.iou_thresholds), eval_cfg.f1ish.primary_iou
    semantic, max_images = eval_cfg.semantic, eval_cfg.artifacts_max_images
    score_mode, include_desc = eval_detection.score_mode, eval_detection.score_include_desc

    rank, world, is_main = _world(accelerator)
    t0 = time.perf_counter()
    was_training = bool(getattr(model, "training", False))
    model.eval()
    oracle = eval_cfg.oracle
    try:
        local = predict_records(
            model, tokenizer, coord_vocab, encoder, records,
            indices=range(rank, len(records), world), backend=backend, backend_kwargs=backend_kwargs,
            batch_size=batch_size, matching=matching, score_mode=score_mode, score_include_desc=include_desc,
            progress=progress and is_main,
        )  # fmt: skip
        if oracle.k > 0:
            if backend is None:
                from rollout.backends import HFGenerationBackend

                backend = HFGenerationBackend(model, tokenizer, **dict(backend_kwargs or {}))
            add_sampled_rollouts(local, model, tokenizer, coord_vocab, encoder, records, backend=backend,
                                 num_samples=oracle.k, temperature=oracle.temperature,
                                 seed=oracle.seed + 1000 * rank, batch_size=batch_size,
                                 matching=matching, score_mode=score_mode, score_include_desc=include_desc)
    finally:
        if was_training:
            model.train()
    results = gather_results(local, len(records), accelerator)
    for r in results:
        r.lvis = dict((lvis_lists or {}).get(r.image_id, {}))
    payload = rollout_metrics(results)

    coco_value = None
    if is_main:
        report, error = None, None
        if enabled:
            report, coco_value, error = _detection_report(results, semantic=semantic, metrics=metrics_kind,
                                                          f1ish_iou=f1ish_iou)
        seconds = time.perf_counter() - t0
        if out_dir is not None:
            _write_outputs(Path(out_dir), results, report, payload, coco_value, error, step, seconds)
            if report is not None:
                _write_artifacts(Path(out_dir), report, primary_iou, max_images)
        # on the training console and train.log (the "coordexp" logger's handlers), not only in files
        logging.getLogger(LOGGER_NAME).info(summary_line(step, payload, report, seconds))
    if enabled:
        if world > 1:
            coco_value = _broadcast_object(coco_value)
        payload[PREFIX + "mAP"] = float(coco_value if coco_value is not None else 0.0)
    return payload


def _detection_report(results: Sequence[SampleResult], **kwargs: Any) -> tuple[DetectionReport | None, float, str | None]:
    """(report, mAP, error) of :func:`evaluate_detection` on the results; any failure gives (None, 0.0, message)."""
    try:
        report = evaluate_detection([r.detection_record() for r in results], **kwargs)
        coco_value = float(report.metrics.get("AP", 0.0))  # metrics f1ish: no AP, 0.0
        if not math.isfinite(coco_value):
            raise FloatingPointError(f"COCO AP is {coco_value}")
        return report, coco_value, None
    except Exception as e:  # noqa: BLE001 - a broken eval must never stop training
        error = f"{type(e).__name__}: {e}"
        logger.warning("eval/rollout/mAP: COCO evaluation failed (%s); logging 0.0 and continuing", error)
        return None, 0.0, error


def summary_line(step: int | None, payload: Mapping[str, float], report: DetectionReport | None, seconds: float) -> str:
    """One console line per in-loop eval: ``eval step 240: mAP 0.1234 AP50 0.2345 F1 0.3456 parse-valid 0.98 (16 images, 3.2s)``.

    COCO numbers come from ``report`` (``n/a`` when detection eval is off or failed); F1 and the
    parse-valid rate from the rollout payload.
    """

    def coco(key: str) -> str:
        return f"{float(report.metrics[key]):.4f}" if report is not None and key in report.metrics else "n/a"

    where = f"step {step}" if step is not None else "(no step)"
    return (f"eval {where}: mAP {coco('AP')} AP50 {coco('AP50')} F1 {payload.get(PREFIX + 'f1', 0.0):.4f} "
            f"parse-valid {payload.get(PREFIX + 'parse_valid_rate', 0.0):.2f} "
            f"({int(payload.get(PREFIX + 'samples_total', 0))} images, {seconds:.1f}s)")


def _write_artifacts(out_dir: Path, report: DetectionReport, primary_iou: float, max_images: int) -> None:
    try:  # like _write_outputs: a full disk or a bad path must not kill the run
        write_artifacts(out_dir, report, primary_iou=primary_iou, max_images=max_images)
    except OSError as e:
        logger.warning("rollout eval: could not write the artifacts in %s (%s)", out_dir, e)


def _write_outputs(out_dir, results, report, payload, coco_value, error, step, seconds) -> None:
    # A full disk or a bad path must not kill a long training run either: warn and go on.
    try:
        write_predictions_jsonl(out_dir / "predictions.jsonl", [r.detection_record() for r in results],
                                extra=[r.extra() for r in results])  # fmt: skip
        rollout = dict(payload)
        if coco_value is not None:
            rollout[PREFIX + "mAP"] = coco_value
        extra = {"rollout": rollout, "step": step, "seconds": seconds, "coco_error": error}
        if report is not None:
            write_metrics_json(out_dir / "metrics.json", report, extra=extra)
        else:
            import json

            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as e:
        logger.warning("rollout eval: could not write %s (%s)", out_dir, e)
