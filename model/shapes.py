"""Parameter sizes that stay true under DeepSpeed ZeRO-3.

ZeRO-3 partitions a parameter in place: outside its module's forward the local tensor is empty
(``shape [0]``, ``numel() == 0``, ``ndim == 1``) and the real size lives in ``ds_shape`` /
``ds_numel``. Code that decides something from a parameter's size at set-up time (weight-decay
groups, embedding rows, memory estimates, parameter counts) reads it through these helpers, so a
ZeRO-3 launch makes the same decisions as a plain one. On ordinary tensors they are the usual
``shape`` / ``numel()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def logical_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's full shape (``ds_shape`` when ZeRO-3 has partitioned it)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def logical_numel(param: torch.Tensor) -> int:
    """The parameter's full element count (``ds_numel`` when ZeRO-3 has partitioned it)."""
    return int(getattr(param, "ds_numel", param.numel()))


@contextlib.contextmanager
def gathered_for_write(params: list[torch.Tensor]) -> Iterator[None]:
    """Whole parameters for an in-place write: ZeRO-3 partitioned ones are gathered for the block
    (rank 0's write is kept and re-partitioned on exit); plain tensors are used as they are."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
        return
    yield
