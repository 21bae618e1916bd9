"""Stage-2 Two-Channel router (docs/training/STAGE2_RUNBOOK.md): which channel each optimizer step takes.

Optimizer step ``s`` (0-based) is a Rollout (Channel-B) step iff
``floor((s+1)*b) > floor(s*b)``: a Bresenham spread, so after ``n`` steps
exactly ``floor(n*b)`` were Rollout steps and they are as evenly spaced as
possible. The decision is a pure function of ``s``: every rank takes the same
channel without communicating, a whole gradient-accumulation window is one
channel, and resume continues the same sequence.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any

from core.vocab import LOGGER_NAME

CHANNEL_A = "A"
CHANNEL_B = "B"

logger = logging.getLogger(LOGGER_NAME)
# Rerouted rollout failures log a traceback for the first few, then every Nth (all are counted).
FALLBACK_LOG_FIRST = 3
FALLBACK_LOG_EVERY = 100


def should_log_failure(n: int) -> bool:
    """Rate limit of the rerouted-failure traceback: the ``n``-th failure (1-based) of this process is logged
    when ``n <= FALLBACK_LOG_FIRST`` or ``n`` is a multiple of ``FALLBACK_LOG_EVERY``."""
    return n <= FALLBACK_LOG_FIRST or n % FALLBACK_LOG_EVERY == 0


def _exact_ratio(b_ratio: float) -> Fraction:
    if isinstance(b_ratio, bool) or not isinstance(b_ratio, (int, float, Fraction)) or not math.isfinite(b_ratio):
        raise ValueError(f"stage2_ab.schedule.b_ratio must be a number in [0, 1], got {b_ratio!r}")
    # The decimal as written in the config: 0.29 is 29/100, so floor(100*b) is
    # 29, not 28 from 28.999999999999996 in binary floating point.
    ratio = b_ratio if isinstance(b_ratio, Fraction) else Fraction(str(b_ratio))
    if not 0 <= ratio <= 1:
        raise ValueError(f"stage2_ab.schedule.b_ratio must be in [0, 1], got {b_ratio!r}")
    return ratio


def is_rollout_step(step: int, b_ratio: float) -> bool:
    """True iff optimizer step ``step`` (0-based) is a Rollout step: ``floor((s+1)b) > floor(s b)``."""
    if step < 0:
        raise ValueError(f"optimizer step must be >= 0, got {step}")
    b = _exact_ratio(b_ratio)
    return ((step + 1) * b).__floor__() > (step * b).__floor__()


class ChannelRouter:
    """Schedules channels and counts what was actually taken.

    Use per optimizer step ``s``: ``ch = router.channel_for(s)``; if a Rollout
    step cannot be built, ``ch = router.fallback_channel(s, exc)`` (raises
    unless ``fallback="expectation"``); after the step ``router.record(s, ch,
    rerouted=...)``; log ``router.metrics()`` through
    ``MetricAggregator.reduce(step_values=...)``.

    State (:meth:`state_dict`) holds the counts and the next expected step, so
    a resumed run reports the same cumulative ``stage2/b_ratio_realized`` and
    rejects skipped or repeated steps.
    """

    def __init__(self, b_ratio: float, fallback: str = "fail"):
        self._b = _exact_ratio(b_ratio)
        self.b_ratio = float(b_ratio)
        self.fallback = fallback  # stage2_ab.fallback.on_rollout_failure (its values checked when the config loads)
        self.count_a = 0  # steps trained on Channel-A (including rerouted ones)
        self.count_b = 0
        self.count_rerouted = 0  # scheduled B, trained A
        self.next_step = 0
        self.failures_seen = 0  # fallback_channel calls in this process (drives the log rate limit; not checkpointed)
        self._last: tuple[str, bool] | None = None  # (channel, rerouted) of the last recorded step

    def channel_for(self, step: int) -> str:
        """Scheduled channel of optimizer step ``step``: ``"A"`` (Expectation) or ``"B"`` (Rollout)."""
        return CHANNEL_B if is_rollout_step(step, self._b) else CHANNEL_A

    def fallback_channel(self, step: int, error: BaseException | None = None) -> str:
        """Channel to use when scheduled Rollout step ``step`` cannot be built.

        Raises ``RuntimeError`` (chained to ``error``) under ``fallback="fail"``;
        returns ``"A"`` under ``"expectation"`` and logs a warning with ``error``'s traceback,
        rate-limited by :func:`should_log_failure` (``error`` None: another rank failed).
        """
        if self.channel_for(step) != CHANNEL_B:
            raise ValueError(f"step {step} is scheduled on Channel-A; only Rollout steps can fall back")
        if self.fallback != "expectation":  # "fail", and anything else: never train a step it was not told to
            raise RuntimeError(
                f"scheduled Rollout step {step} could not be built ({error!r}); set "
                "stage2_ab.fallback.on_rollout_failure: expectation to train such steps as Expectation steps instead"
            ) from error
        self.failures_seen += 1
        n = self.failures_seen
        if should_log_failure(n):
            cause = "its rollout failed" if error is not None else "a rollout failed on another rank"
            logger.warning(
                "scheduled Rollout step %d trains as an Expectation step (stage2_ab.fallback.on_rollout_failure: "
                "expectation): %s; failure %d of this process (tracebacks: first %d, then every %dth; every "
                "rerouted step counts in stage2/rollout_fallback_count)",
                step, cause, n, FALLBACK_LOG_FIRST, FALLBACK_LOG_EVERY,
                exc_info=(type(error), error, error.__traceback__) if error is not None else None,
            )
        return CHANNEL_A

    def record(self, step: int, channel_taken: str, rerouted: bool = False) -> None:
        """Count the channel optimizer step ``step`` actually trained on.

        Steps must be recorded in order (``0, 1, 2, ...`` continuing after a
        resume). ``rerouted=True`` only for a scheduled B step trained as A
        under the ``expectation`` fallback.
        """
        if step != self.next_step:
            raise ValueError(
                f"router.record: expected optimizer step {self.next_step}, got {step} (skipped or repeated)"
            )
        scheduled = self.channel_for(step)
        if channel_taken not in (CHANNEL_A, CHANNEL_B):
            raise ValueError(f"router.record: channel must be 'A' or 'B', got {channel_taken!r}")
        if rerouted:
            if self.fallback != "expectation":
                raise ValueError(
                    "router.record: rerouted=True needs stage2_ab.fallback.on_rollout_failure: expectation"
                )
            if scheduled != CHANNEL_B or channel_taken != CHANNEL_A:
                raise ValueError(f"router.record: step {step} rerouted must be scheduled B and taken A")
            self.count_rerouted += 1
        elif channel_taken != scheduled:
            raise ValueError(
                f"router.record: step {step} is scheduled {scheduled}, got {channel_taken} without rerouted"
            )
        if channel_taken == CHANNEL_A:
            self.count_a += 1
        else:
            self.count_b += 1
        self.next_step += 1
        self._last = (channel_taken, rerouted)

    @property
    def b_ratio_realized(self) -> float:
        """Fraction of recorded steps that trained on Channel-B (0.0 before any step)."""
        n = self.count_a + self.count_b
        return self.count_b / n if n else 0.0

    def metrics(self) -> dict[str, float]:
        """Step-level metrics of the last recorded step (identical on every rank).

        ``stage2/channel_{a,b}_count`` and ``stage2/rollout_fallback_count`` are
        this step's counts (0 or 1), so they are true counters: summing them
        over the log gives the run totals. ``stage2/b_ratio_realized`` is the
        cumulative gauge ``B steps / steps`` since step 0 (resume-safe).
        Pass them to ``MetricAggregator.reduce(step_values=...)``, never to
        ``add`` (that would sum them over micro-steps and ranks).
        """
        if self._last is None:
            raise RuntimeError("router.metrics() before any router.record(...)")
        channel, rerouted = self._last
        return {
            "stage2/b_ratio_realized": self.b_ratio_realized,
            "stage2/channel_a_count": float(channel == CHANNEL_A),
            "stage2/channel_b_count": float(channel == CHANNEL_B),
            "stage2/rollout_fallback_count": float(rerouted),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "b_ratio": self.b_ratio,
            "fallback": self.fallback,
            "count_a": self.count_a,
            "count_b": self.count_b,
            "count_rerouted": self.count_rerouted,
            "next_step": self.next_step,
            "last": list(self._last) if self._last is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts; a changed ``b_ratio`` is refused (it would change the past sequence)."""
        if _exact_ratio(state["b_ratio"]) != self._b:
            raise ValueError(
                f"resume: checkpoint was trained with stage2_ab.schedule.b_ratio={state['b_ratio']}, "
                f"config says {self.b_ratio}; set it back to resume the same sequence"
            )
        self.count_a = int(state["count_a"])
        self.count_b = int(state["count_b"])
        self.count_rerouted = int(state["count_rerouted"])
        self.next_step = int(state["next_step"])
        last = state.get("last")
        self._last = (str(last[0]), bool(last[1])) if last is not None else None
