"""Content checks run on CPU tensors and, on accelerators, only with COORDEXP_CHECKS=1 (no hot-path syncs).

The ``meta`` device stands in for an accelerator: like CUDA, reading a value back from it is not
free (it is impossible), so a check that ran there would raise instead of passing silently.
"""

from __future__ import annotations

import pytest
import torch

from losses.ce import hidden_at_logit_pos
from losses.checks import content_checks


def test_content_checks_on_cpu_and_by_env(monkeypatch):
    monkeypatch.delenv("COORDEXP_CHECKS", raising=False)
    assert content_checks(torch.zeros(1))
    assert not content_checks(torch.zeros(1, device="meta"))
    monkeypatch.setenv("COORDEXP_CHECKS", "1")
    assert content_checks(torch.zeros(1, device="meta"))
    monkeypatch.setenv("COORDEXP_CHECKS", "0")
    assert not content_checks(torch.zeros(1))


def test_position_check_reads_no_device_value_unless_asked(monkeypatch):
    monkeypatch.delenv("COORDEXP_CHECKS", raising=False)
    bad = torch.tensor([0, 3])  # position 0 of row 0 has no logit position
    with pytest.raises(ValueError, match="no logit position"):
        hidden_at_logit_pos(torch.zeros(1, 4, 2), bad)
    rows = hidden_at_logit_pos(torch.zeros(1, 4, 2, device="meta"), bad.to("meta"))
    assert rows.shape == (2, 2)  # skipped on the device: no value was read back
    monkeypatch.setenv("COORDEXP_CHECKS", "1")
    with pytest.raises(RuntimeError, match="meta"):  # asked for: the check runs and must read a value
        hidden_at_logit_pos(torch.zeros(1, 4, 2, device="meta"), bad.to("meta"))
