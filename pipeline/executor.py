"""Run a resolved pipeline on one TeacherForcingContext (docs/training/PIPELINE.md).

Objective modules run in list order (disabled ones skipped; in Stage-2 Two-Channel, modules
whose ``channels`` exclude ``ctx.channel`` contribute neither loss nor metrics) and
``loss = Σ entry.weight x module loss``. A missing prerequisite raises (the step fails).
Diagnostics run afterwards under ``torch.no_grad``; one that raises warns once and is skipped for
the rest of the run: a ``PipelineExecutor`` is a value a recipe builds once per run, holding which
diagnostics failed (no process-wide state; a new executor starts over). Every module gets the
pipeline-level ``PipelineSettings`` explicitly. Modules never call collectives: the metrics are
this micro-step's values for the one aggregator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from configs.modules import TokenCEWeights
from configs.pipeline import PIPELINE_LOCATIONS, STAGE2_TWO_CHANNEL, ResolvedPipeline
from core.vocab import loss_key
from pipeline.context import PipelineError, TeacherForcingContext
from pipeline.registry import PipelineSettings, get_module


@dataclass
class PipelineResult:
    """loss: scalar tensor to back-propagate (``loss/total``); metrics: key -> float for the aggregator."""

    loss: torch.Tensor
    metrics: dict[str, float]


def _runs(spec, ctx: TeacherForcingContext) -> bool:
    return spec.enabled and (ctx.channel is None or ctx.channel in spec.channels)


def _check_channel(resolved: ResolvedPipeline, ctx: TeacherForcingContext) -> None:
    if resolved.variant == STAGE2_TWO_CHANNEL and ctx.channel is None:
        raise PipelineError("stage2_two_channel steps must say their channel: TeacherForcingContext(channel='A' or 'B')")
    if resolved.variant != STAGE2_TWO_CHANNEL and ctx.channel is not None:
        raise PipelineError(
            f"{resolved.variant} runs every module each step; build its TeacherForcingContext with channel=None "
            f"(got {ctx.channel!r})"
        )


def _merge(metrics: dict, new: dict, module: str, owners: dict[str, str]) -> None:
    for key, value in new.items():
        if key in metrics:
            raise PipelineError(f"metric {key!r} emitted by both {owners[key]!r} and {module!r}; every key has one owner")
        metrics[key] = value
        owners[key] = module


def _to_floats(metrics: dict) -> dict[str, float]:
    # One device->host transfer for all tensor metrics instead of one sync per key.
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, stacked))
    return {k: out[k] for k in metrics}


def pipeline_settings(resolved: ResolvedPipeline) -> PipelineSettings:
    """The pipeline-level settings of ``resolved`` (token_ce's knobs, or the defaults without token_ce)."""
    token_ce = next((m for m in resolved.objective if m.name == "token_ce"), None)
    return PipelineSettings(token_ce_weights=TokenCEWeights(**token_ce.config) if token_ce is not None else TokenCEWeights())


@dataclass
class PipelineExecutor:
    """Runs ``resolved`` on one micro-step's context at a time; build one per run.

    ``failed_diagnostics``: names of diagnostics modules that raised once in this run (warned
    about through ``warn(message, RuntimeWarning)`` and skipped from then on).
    """

    resolved: ResolvedPipeline
    warn: Callable[..., object] = warnings.warn
    failed_diagnostics: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.settings = pipeline_settings(self.resolved)

    def run(self, ctx: TeacherForcingContext) -> PipelineResult:
        """Objective modules -> loss, then diagnostics -> metrics, for one micro-step.

        Returns ``PipelineResult(loss, metrics)`` with ``metrics["loss/total"]``.
        """
        resolved, settings = self.resolved, self.settings
        _check_channel(resolved, ctx)
        loc = PIPELINE_LOCATIONS[resolved.variant]

        metrics: dict[str, object] = {}
        owners: dict[str, str] = {}
        total = None
        for i, spec in enumerate(resolved.objective):
            if not _runs(spec, ctx):
                continue
            try:
                out = get_module(spec.name).fn(ctx, spec, settings)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11: say where the step failed without changing the error type
                    exc.add_note(f"in objective module {spec.name!r} ({loc}.objective[{i}], channel {ctx.channel})")
                raise
            if out.loss is None:
                raise PipelineError(f"objective module {spec.name!r} returned no loss")
            term = spec.weight * out.loss
            total = term if total is None else total + term
            _merge(metrics, out.metrics, spec.name, owners)
        if total is None:
            # Every objective module is scoped to the other channel: an exact 0 that still reaches
            # the graph so backward() behaves the same on every rank.
            total = sum(h.sum() for h in ctx.hidden.values()) * 0.0
        metrics[loss_key("total")] = total

        with torch.no_grad():
            for spec in resolved.diagnostics:
                if not _runs(spec, ctx) or spec.name in self.failed_diagnostics:
                    continue
                try:
                    out = get_module(spec.name).fn(ctx, spec, settings)
                    _merge(metrics, out.metrics, spec.name, owners)
                except Exception as exc:  # diagnostics never stop training (docs/training/PIPELINE.md)
                    self.failed_diagnostics.add(spec.name)
                    self.warn(
                        f"diagnostics module {spec.name!r} failed ({type(exc).__name__}: {exc}); "
                        "it is skipped for the rest of this run",
                        RuntimeWarning,
                    )
        return PipelineResult(loss=total, metrics=_to_floats(metrics))


def run_pipeline(
    resolved: ResolvedPipeline,
    ctx: TeacherForcingContext,
    *,
    warn: Callable[..., object] = warnings.warn,
) -> PipelineResult:
    """One micro-step on a fresh ``PipelineExecutor`` (tests, one-off calls; recipes keep one executor)."""
    return PipelineExecutor(resolved, warn=warn).run(ctx)


__all__ = ["PipelineExecutor", "PipelineResult", "pipeline_settings", "run_pipeline"]
