"""The one step-metrics aggregator (docs/training/METRICS_CONTRACT.md).

Trainers and pipeline modules hand it plain per-micro-step scalars; it turns
them into one dict per optimizer step. Reduction depends on the key's class:

- ``counter`` (suffix ``_total``, ``_count``, ``_sum``, ``_num``, ``_den``):
  summed over micro-steps and ranks;
- ``time`` (``time/*``): summed over the micro-steps of a rank, max over ranks
  (the step took as long as its slowest rank);
- ``mean`` (everything else: ``loss/*``, ``*_mean``, ``*_rate``, ``*_frac``,
  gauges): averaged over the micro-steps where the key is present, then over
  the ranks where it is present. Absent is not zero: a Channel-B-only key on a
  rank that had no rollout micro-step does not dilute the mean;
- ``internal`` (last path segment starts with ``_``, e.g. ``rollout/_sim_sum``):
  summed like a counter, usable by derived metrics, never emitted.

Derived metrics (``precision = matched / pred`` …) are computed *after* the
cross-rank sums, so they are exact over the whole step instead of being means
of per-micro-step ratios.

DDP: every rank issues the same three collectives in the same order whatever
keys it holds (gather key names, one SUM all_reduce, one MAX all_reduce), so a
rank with fewer keys or fewer micro-steps can never make another rank hang.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from core.vocab import known_components, loss_key
from rollout.metrics import precision_recall_f1

COUNTER_SUFFIXES: tuple[str, ...] = ("_total", "_count", "_sum", "_num", "_den")
KEY_CLASSES: tuple[str, ...] = ("counter", "time", "mean", "internal")

_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def classify_key(key: str) -> str:
    """Reduction class of a metric key: ``"internal"``, ``"time"``, ``"counter"`` or ``"mean"``.

    Precedence is in that order: ``time/_x`` is internal, ``time/gen_count`` is
    a time (max over ranks), ``loss/*`` can never be a counter because
    :func:`check_metric_key` rejects counter suffixes there.
    """
    last = key.rsplit("/", 1)[-1]
    if last.startswith("_"):
        return "internal"
    if key.startswith("time/"):
        return "time"
    if key.endswith(COUNTER_SUFFIXES):
        return "counter"
    return "mean"


def _check_loss_key(key: str) -> None:
    parts = key.split("/")[1:]
    if parts == ["total"]:
        return
    if not parts or parts[0] not in known_components():
        raise ValueError(
            f"metric key {key!r}: unknown loss component {parts[0] if parts else ''!r}; "
            f"allowed: loss/total or loss/<component>[/<sub>][/<context>] with component in {', '.join(known_components())}"
        )
    component, rest = parts[0], parts[1:]
    # loss/<component>/<x> is a sub-term or a context; /<sub>/<context> is both.
    candidates: list[tuple[str | None, str | None]] = []
    if len(rest) == 0:
        candidates = [(None, None)]
    elif len(rest) == 1:
        candidates = [(rest[0], None), (None, rest[0])]
    elif len(rest) == 2:
        candidates = [(rest[0], rest[1])]
    errors = []
    for sub, context in candidates:
        try:
            if loss_key(component, sub, context) == key:
                return
        except KeyError as exc:
            errors.append(str(exc))
    raise ValueError(
        f"metric key {key!r} is not a canonical loss key (docs/training/METRICS_LOSSES.md): {'; '.join(errors) or 'too many path segments'}. "
        "Build loss keys with core.vocab.loss_key(component, sub, context)."
    )


def check_metric_key(key: str) -> str:
    """Raise ``ValueError`` if ``key`` breaks the metrics contract; return its class.

    Rules (docs/training/METRICS_CONTRACT.md):

    - path segments of ``[A-Za-z0-9_.-]`` joined by ``/``;
    - ``loss/*`` keys are exactly what ``core.vocab.loss_key`` builds
      (``loss/total``, ``loss/<component>[/<sub>][/<context>]``) and hence
      mean-like; internal ``loss/.../_x`` helpers are allowed;
    - no alias spellings of losses elsewhere: no segment ``loss`` after the
      first, none starting with ``loss_`` or ending in ``_loss``, and outside
      ``loss/`` and ``time/`` no segment equal to a component name
      (``train/struct_ce``);
    - ``rollout/drop_<reason>`` keys end in ``_count``.
    """
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"metric key {key!r}: use path segments of [A-Za-z0-9_.-] joined by '/', e.g. 'rollout/fp_total'"
        )
    cls = classify_key(key)
    segments = key.split("/")
    for i, seg in enumerate(segments):
        if seg.startswith("loss_") or seg.endswith("_loss") or (seg == "loss" and i > 0):
            raise ValueError(
                f"metric key {key!r}: loss alias spelling; losses are logged only as loss/<component>[/<sub>][/<context>] "
                f"(e.g. 'loss/struct_ce'), built with core.vocab.loss_key"
            )
    if segments[0] == "loss":
        if cls != "internal":
            _check_loss_key(key)
        return cls
    if segments[0] != "time":
        components = known_components()
        for seg in segments:
            if seg in components:
                raise ValueError(
                    f"metric key {key!r}: loss component {seg!r} outside the loss/ namespace; use 'loss/{seg}'"
                )
    if segments[0] == "rollout" and len(segments) == 2 and segments[1].startswith("drop_"):
        if not segments[1].endswith("_count"):
            raise ValueError(f"metric key {key!r}: drop reasons are counters named 'rollout/drop_<reason>_count'")
    return cls


# ------------------------------------------------------------------ derived

DerivedFn = Callable[[Mapping[str, float]], "float | None"]


@dataclass(frozen=True)
class Ratio:
    """``num / den`` over the whole step (after micro-step and rank sums).

    Returns ``None`` (key not emitted) when the numerator or the denominator
    was not reported this step (a step without rollouts has no parse rate),
    ``empty`` when the denominator is 0 (e.g. precision with no predictions
    is 0, not NaN; ``empty=None``: not emitted, for means that need support).
    """

    num: str
    den: str
    empty: float | None = 0.0

    def __call__(self, values: Mapping[str, float]) -> float | None:
        if self.den not in values or self.num not in values:
            return None
        den = values[self.den]
        return self.empty if den == 0 else values[self.num] / den


@dataclass(frozen=True)
class F1:
    """``2·matched / (pred + gt)`` over the step: the harmonic mean of the exact precision and recall."""

    matched: str
    pred: str
    gt: str

    def __call__(self, values: Mapping[str, float]) -> float | None:
        if not any(k in values for k in (self.matched, self.pred, self.gt)):
            return None
        return precision_recall_f1(values.get(self.matched, 0.0), values.get(self.pred, 0.0), values.get(self.gt, 0.0))[2]


# Rollout precision/recall/f1 from the docs/training/METRICS_CONTRACT.md counters. Matched / valid
# predictions: invalid (dropped) objects are counted by rollout/drop_*_count and
# parse_valid_rate, not as false positives here.
# Every per-sample rate is a ratio of step sums too: a mean of per-micro-step ratios would weigh a
# micro-step of 1 sample like one of 8 (parse_valid_rate 0.5 where the step's true rate is 0.25).
ROLLOUT_DERIVED: dict[str, DerivedFn] = {
    "rollout/precision": Ratio("rollout/matched_total", "rollout/valid_pred_objects_total"),
    "rollout/recall": Ratio("rollout/matched_total", "rollout/gt_objects_total"),
    "rollout/f1": F1("rollout/matched_total", "rollout/valid_pred_objects_total", "rollout/gt_objects_total"),
    "rollout/parse_valid_rate": Ratio("rollout/_parse_valid_num", "rollout/_samples_den"),
    "rollout/gt_per_sample": Ratio("rollout/gt_objects_total", "rollout/_samples_den"),
    "rollout/pred_per_sample": Ratio("rollout/valid_pred_objects_total", "rollout/_samples_den"),
    # Stage-2 desc gate (rollout_matching.matching.desc_gate): mean desc similarity of the matched pairs
    "rollout/desc_sim_mean": Ratio("rollout/_desc_sim_sum", "rollout/_desc_sim_den", empty=None),
}

# Every named ratio the recipes log, as a ratio of step sums: the rollout rates above and the packing
# fill (tokens / [B, T] slots). Any module's per-item means follow the generic rule of sum_den_ratios.
STEP_DERIVED: dict[str, DerivedFn] = {
    **ROLLOUT_DERIVED,
    "packing/fill_frac": Ratio("train/tokens_total", "packing/_slots_den"),
}

_SUM_KEY = re.compile(r"^(?P<prefix>.+)/_(?P<name>[^/]+)_sum$")


def sum_den_ratios(values: Mapping[str, float]) -> dict[str, float | None]:
    """The generic mean of a step: every internal pair ``<p>/_<name>_sum``, ``<p>/_<name>_den`` (summed over
    micro-steps and ranks) gives ``<p>/<name> = sum / den``; None (not emitted) where the den is 0. A module
    that wants an exact per-item mean (``coord_diag``: per coord position) emits the two, nothing else."""
    out: dict[str, float | None] = {}
    for key, total in values.items():
        match = _SUM_KEY.match(key)
        den_key = match and f"{match['prefix']}/_{match['name']}_den"
        if match and den_key in values:
            den = values[den_key]
            out[f"{match['prefix']}/{match['name']}"] = total / den if den else None
    return out


# --------------------------------------------------------------- aggregator


def _to_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().float().cpu().item())
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"metric {key!r}: expected a number or scalar tensor, got {type(value).__name__}")
    try:  # numpy scalars and the like
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number or scalar tensor, got {type(value).__name__}") from None


class MetricAggregator:
    """Collect per-micro-step metrics; :meth:`reduce` once per optimizer step.

    Args:
        accelerator: an ``accelerate.Accelerator`` (its ``num_processes`` and
            ``device`` pick the collective path) or ``None``. With ``None`` the
            aggregator still reduces across ranks when ``torch.distributed`` is
            initialised with world size > 1.
        derived: ``{output key: fn(reduced values incl. internal) -> float | None}``,
            computed after the cross-rank reduction; a derived key replaces a
            same-named mean-like value. Default: :data:`STEP_DERIVED`.
        strict: run :func:`check_metric_key` on every new key.
    """

    def __init__(self, accelerator: Any = None, derived: Mapping[str, DerivedFn] | None = None, strict: bool = True):
        self.accelerator = accelerator
        self.derived: dict[str, DerivedFn] = dict(STEP_DERIVED if derived is None else derived)
        for name in self.derived:
            if classify_key(name) != "mean":
                raise ValueError(f"derived metric {name!r} must be a mean-like (ratio) key, not {classify_key(name)}")
        self.strict = strict
        self._checked: dict[str, str] = {}
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.num_micro_steps = 0

    def _class(self, key: str) -> str:
        cls = self._checked.get(key)
        if cls is None:
            cls = check_metric_key(key) if self.strict else classify_key(key)
            self._checked[key] = cls
        return cls

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Record one micro-step's scalars (floats or 1-element tensors); a bad key or value adds nothing."""
        converted = {}
        for key, value in metrics.items():
            self._class(key)
            converted[key] = _to_float(key, value)
        for key, value in converted.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1
        self.num_micro_steps += 1

    # -- distributed helpers

    def _world(self) -> int:
        if self.accelerator is not None:
            return int(self.accelerator.num_processes)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    def _device(self) -> torch.device:
        if self.accelerator is not None:
            return torch.device(self.accelerator.device)
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _local(self) -> dict[str, tuple[str, float]]:
        """Per-rank reduction: key -> (class, value) with means over micro-steps where present."""
        out = {}
        for key, total in self._sums.items():
            cls = self._class(key)
            out[key] = (cls, total / self._counts[key] if cls == "mean" else total)
        return out

    def reduce(self, step_values: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Reduce this step's micro-steps over ranks, reset, and return the log dict.

        ``step_values`` are step-level values that are already identical on
        every rank (e.g. :meth:`training.router.ChannelRouter.metrics`); they
        are merged as-is after the reduction and may not collide with
        aggregated keys. Every rank must call ``reduce`` at every optimizer
        step (collectives inside); all ranks get the same dict.
        """
        local = self._local()
        self._reset()
        world = self._world()
        if world <= 1:
            reduced = {key: value for key, (_, value) in local.items()}
        else:
            reduced = self._reduce_distributed(local, world)

        out = {k: v for k, v in reduced.items() if classify_key(k) != "internal"}
        for name, fn in self.derived.items():
            value = fn(reduced)
            if value is not None:
                out[name] = float(value)
        for name, value in sum_den_ratios(reduced).items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = float(value)
        for key, value in (step_values or {}).items():
            self._class(key)
            if key in out:
                raise ValueError(f"step value {key!r} collides with an aggregated metric of the same name")
            out[key] = _to_float(key, value)
        return dict(sorted(out.items()))

    def _reduce_distributed(self, local: dict[str, tuple[str, float]], world: int) -> dict[str, float]:
        import torch.distributed as dist

        # 1) union of key names: every rank then builds identically-shaped tensors.
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, sorted(local))
        keys = sorted(set().union(*gathered))
        index = {k: i for i, k in enumerate(keys)}
        n = max(len(keys), 1)  # never an empty collective
        device = self._device()

        # 2) one SUM: values (rows 0) and presence (rows 1) side by side.
        summed = torch.zeros(2, n, dtype=torch.float64, device=device)
        # 3) one MAX for time/*: missing = -inf so a rank without the key never wins.
        maxed = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        for key, (cls, value) in local.items():
            i = index[key]
            if cls == "time":
                maxed[i] = value
            else:
                summed[0, i] = value
            summed[1, i] = 1.0
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        summed, maxed = summed.cpu(), maxed.cpu()

        out = {}
        for key, i in index.items():
            cls = classify_key(key)
            if cls == "time":
                out[key] = float(maxed[i])
            elif cls == "mean":
                out[key] = float(summed[0, i] / summed[1, i])
            else:
                out[key] = float(summed[0, i])
        return out
