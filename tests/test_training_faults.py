"""Unit tests of training/faults.py: the non-finite guard and the finite-weights check."""

from __future__ import annotations

import pytest
import torch

from training.faults import NonFiniteError, NonFiniteGuard, any_rank, weights_finite


def test_guard_skips_counts_and_stops_after_a_streak():
    guard = NonFiniteGuard(max_consecutive=2)
    guard.observe_loss(torch.tensor(1.0))
    assert guard.step_is_finite(torch.tensor(0.5)) == (True, ())
    assert guard.record(1) == 0.0
    # a NaN loss on any micro-step of the window makes the step non-finite, and the flag resets
    guard.observe_loss(torch.tensor(float("nan")))
    guard.observe_loss(torch.tensor(1.0))
    assert guard.step_is_finite(1.0)[0] is False
    assert guard.record(2) == 1.0
    guard.check_streak(2, lambda: None, 1e-3)  # 1 < 2: goes on
    assert guard.step_is_finite(float("inf"))[0] is False  # grad norm alone
    assert guard.record(3) == 1.0
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(steps 2-3\).*no checkpoint"):
        guard.check_streak(3, lambda: None, 1e-3)
    # a finite step ends the streak; the total stays
    assert guard.step_is_finite(1.0)[0] is True and guard.record(4) == 0.0
    assert (guard.streak, guard.skipped_total) == (0, 2)
    guard.check_streak(4, lambda: None, 1e-3)


def test_other_flags_ride_on_the_same_agreement():
    guard = NonFiniteGuard(max_consecutive=10)
    assert guard.step_is_finite(1.0, other_flags=(True, False)) == (True, (True, False))
    assert any_rank(None, False, True) == (False, True)


def test_weights_finite():
    params = [torch.zeros(3, 4), torch.full((2,), 1e10)]
    assert weights_finite(None, params)
    params[0][1, 2] = float("inf")
    assert not weights_finite(None, params)
    params[0][1, 2] = float("nan")
    assert not weights_finite(None, params)
    assert weights_finite(None, [])
