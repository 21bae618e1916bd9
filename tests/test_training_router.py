"""Two-Channel router (docs/training/STAGE2_RUNBOOK.md): Bresenham schedule, fallback, metrics, resume."""

from __future__ import annotations

import json

import pytest

from training.aggregator import MetricAggregator, check_metric_key
from training.router import ChannelRouter, is_rollout_step

# First 10 optimizer steps, written out by hand from floor((s+1)b) > floor(s b).
SEQUENCES = {
    0.0: "AAAAAAAAAA",
    0.2: "AAAABAAAAB",  # s=4: floor(1.0)=1 > floor(0.8)=0
    0.25: "AAABAAABAA",  # s=3: floor(1.0)=1 > floor(0.75)=0
    0.5: "ABABABABAB",
    1.0: "BBBBBBBBBB",
}


@pytest.mark.parametrize("b_ratio", sorted(SEQUENCES))
def test_first_ten_steps(b_ratio):
    router = ChannelRouter(b_ratio)
    assert "".join(router.channel_for(s) for s in range(10)) == SEQUENCES[b_ratio]
    assert "".join("B" if is_rollout_step(s, b_ratio) else "A" for s in range(10)) == SEQUENCES[b_ratio]


def test_exact_decimal_ratio_no_float_drift():
    # In binary floating point 100 * 0.29 == 28.999999999999996, which would put
    # only 28 Rollout steps in the first 100. The config's decimal is exact.
    assert sum(is_rollout_step(s, 0.29) for s in range(100)) == 29
    assert is_rollout_step(99, 0.29)


@pytest.mark.parametrize("b_ratio", [0.2, 0.3, 1 / 3, 0.7])
def test_prefix_counts_are_floor_n_b(b_ratio):
    from fractions import Fraction

    b = Fraction(str(b_ratio))
    taken = 0
    for s in range(200):
        taken += is_rollout_step(s, b_ratio)
        assert taken == ((s + 1) * b).__floor__()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.2", True])
def test_invalid_ratio(bad):
    with pytest.raises(ValueError, match="stage2_ab.schedule.b_ratio"):
        ChannelRouter(bad)


def test_a_fallback_other_than_expectation_fails_the_step():
    """Only "expectation" reroutes a failed Rollout step; "fail" and a value mistyped in code both raise."""
    for fallback in ("fail", "skip"):
        with pytest.raises(RuntimeError, match="could not be built"):
            ChannelRouter(1.0, fallback=fallback).fallback_channel(0, ValueError("boom"))
    assert ChannelRouter(1.0, fallback="expectation").fallback_channel(0, ValueError("boom")) == "A"


def _run(router: ChannelRouter, steps: range, fail_at: frozenset = frozenset()) -> list[dict]:
    log = []
    for s in steps:
        ch = router.channel_for(s)
        rerouted = False
        if ch == "B" and s in fail_at:
            ch = router.fallback_channel(s, RuntimeError("no valid rollout"))
            rerouted = True
        router.record(s, ch, rerouted=rerouted)
        log.append(router.metrics())
    return log


def test_metrics_per_step_counts_and_cumulative_ratio():
    router = ChannelRouter(0.5, fallback="expectation")
    log = _run(router, range(4), fail_at=frozenset({3}))
    assert log == [
        {
            "stage2/b_ratio_realized": 0.0,
            "stage2/channel_a_count": 1.0,
            "stage2/channel_b_count": 0.0,
            "stage2/rollout_fallback_count": 0.0,
        },
        {
            "stage2/b_ratio_realized": 0.5,
            "stage2/channel_a_count": 0.0,
            "stage2/channel_b_count": 1.0,
            "stage2/rollout_fallback_count": 0.0,
        },
        {
            "stage2/b_ratio_realized": 1 / 3,
            "stage2/channel_a_count": 1.0,
            "stage2/channel_b_count": 0.0,
            "stage2/rollout_fallback_count": 0.0,
        },
        # step 3 was scheduled B but fell back: trained A
        {
            "stage2/b_ratio_realized": 0.25,
            "stage2/channel_a_count": 1.0,
            "stage2/channel_b_count": 0.0,
            "stage2/rollout_fallback_count": 1.0,
        },
    ]
    assert (router.count_a, router.count_b, router.count_rerouted) == (3, 1, 1)
    for key in log[0]:
        check_metric_key(key)


def _raised(message: str) -> RuntimeError:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        return exc


def test_fallback_logs_traceback_rate_limited():
    import logging

    from training.router import FALLBACK_LOG_EVERY, FALLBACK_LOG_FIRST, should_log_failure

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    router = ChannelRouter(1.0, fallback="expectation")
    logger, keep = logging.getLogger("coordexp"), Keep()
    logger.addHandler(keep)
    try:
        for s in range(2 * FALLBACK_LOG_EVERY):
            assert router.fallback_channel(s, _raised(f"generate broke at {s}")) == "A"
    finally:
        logger.removeHandler(keep)
    expected_steps = [n - 1 for n in range(1, 2 * FALLBACK_LOG_EVERY + 1) if should_log_failure(n)]
    assert expected_steps == [0, 1, 2, FALLBACK_LOG_EVERY - 1, 2 * FALLBACK_LOG_EVERY - 1]
    assert len(keep.records) == FALLBACK_LOG_FIRST + 2
    formatter = logging.Formatter()
    for record, step in zip(keep.records, expected_steps):
        text = formatter.format(record)
        assert f"step {step} trains as an Expectation step" in text
        assert "Traceback" in text and f"generate broke at {step}" in text and "_raised" in text
    assert router.failures_seen == 2 * FALLBACK_LOG_EVERY


def test_router_rejects_non_finite_b_ratio():
    with pytest.raises(ValueError, match="stage2_ab.schedule.b_ratio"):
        ChannelRouter(float("nan"))


def test_router_metrics_through_aggregator_are_not_summed():
    router = ChannelRouter(1.0)
    agg = MetricAggregator()
    for _ in range(4):  # 4 micro-steps of one optimizer step
        agg.add({"loss/total": 1.0})
    router.record(0, router.channel_for(0))
    out = agg.reduce(step_values=router.metrics())
    assert out["stage2/channel_b_count"] == 1.0 and out["stage2/b_ratio_realized"] == 1.0


def test_fail_fallback_raises_with_config_hint():
    router = ChannelRouter(1.0)
    with pytest.raises(RuntimeError, match="on_rollout_failure: expectation"):
        router.fallback_channel(0, ValueError("parse failed"))
    with pytest.raises(ValueError, match="rerouted"):
        router.record(0, "A", rerouted=True)


def test_record_rejects_wrong_channel_and_out_of_order_steps():
    router = ChannelRouter(0.5, fallback="expectation")
    with pytest.raises(ValueError, match="scheduled A"):
        router.record(0, "B")
    router.record(0, "A")
    with pytest.raises(ValueError, match="expected optimizer step 1"):
        router.record(2, "A")
    with pytest.raises(ValueError, match="scheduled B"):
        router.record(1, "A")  # B step trained as A needs rerouted=True
    with pytest.raises(ValueError, match="only Rollout steps"):
        router.fallback_channel(0)
    with pytest.raises(RuntimeError, match="before any"):
        ChannelRouter(0.2).metrics()


def test_resume_continues_same_sequence_and_counts():
    fail_at = frozenset({4})
    straight = ChannelRouter(0.25, fallback="expectation")
    full_log = _run(straight, range(12), fail_at)

    first = ChannelRouter(0.25, fallback="expectation")
    log_a = _run(first, range(6), fail_at)
    saved = json.loads(json.dumps(first.state_dict()))  # as it travels in trainer_state.json
    resumed = ChannelRouter(0.25, fallback="expectation")
    resumed.load_state_dict(saved)
    log_b = _run(resumed, range(6, 12), fail_at)

    assert log_a + log_b == full_log
    assert resumed.state_dict() == straight.state_dict()
    with pytest.raises(ValueError, match="expected optimizer step 6"):
        r = ChannelRouter(0.25, fallback="expectation")
        r.load_state_dict(saved)
        r.record(0, "A")


def test_resume_with_changed_ratio_refused():
    router = ChannelRouter(0.2)
    _run(router, range(3))
    other = ChannelRouter(0.3)
    with pytest.raises(ValueError, match="b_ratio=0.2"):
        other.load_state_dict(router.state_dict())
