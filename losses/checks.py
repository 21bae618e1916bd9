"""When the loss path validates tensor *contents* (positions in range, masks consistent).

Such a check reads a value back to the host (``.any()`` in an ``if``, ``.item()``, ``int(t)``): on a
GPU that is a host<->device synchronisation that drains the launch queue and leaves the GPU idle
until the host catches up, once per check per micro-step. On CPU it costs nothing. So content
checks run on CPU tensors always (every test and the demo run them) and on accelerator tensors
only when the environment sets ``COORDEXP_CHECKS=1`` (debugging a GPU run); ``COORDEXP_CHECKS=0``
turns them off on CPU too (``bench/bench_train_step.py`` counts a CPU step's host reads that way,
as the GPU path runs). Shape and argument checks, which need no device value, always run.
"""

from __future__ import annotations

import os

import torch


def content_checks(tensor: torch.Tensor) -> bool:
    """True when checks that read ``tensor``'s values should run (CPU, or ``COORDEXP_CHECKS=1``)."""
    forced = os.environ.get("COORDEXP_CHECKS")
    if forced in ("0", "1"):
        return forced == "1"
    return tensor.device.type == "cpu"
