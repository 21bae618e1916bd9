"""Post-rollout packing: teacher-forced rollout samples -> packed rows (docs/training/STAGE2_RUNBOOK.md).

Rollout sequences only exist after generation, so they are packed per step (not statically).
Rows are chosen by ``data.packing.pack_lengths`` (first-fit-decreasing, deterministic: same
lengths -> same rows) and collated by ``data.packing.collate_rows``; nothing here re-implements
either.
"""

from __future__ import annotations

from collections.abc import Sequence

from data.packing import PackingError, collate_rows, pack_lengths
from data.types import EncodedSample, PackedBatch


def pack_rollout_samples(
    samples: Sequence[EncodedSample], max_length: int, pad_token_id: int, *, rows_per_batch: int = 1
) -> list[PackedBatch]:
    """Pack rollout samples into rows of at most ``max_length`` tokens (``training.max_length``).

    Returns one ``PackedBatch`` per ``rows_per_batch`` rows (``[rows, T]`` tensors), rows in the
    order ``pack_lengths`` opens them. Every sample appears exactly once. A sample longer than
    ``max_length`` raises ``PackingError`` naming its index and length. Each segment's
    ``sample_index`` is the sample's index in ``samples``.
    """
    if rows_per_batch <= 0:
        raise PackingError(f"rows_per_batch must be a positive integer, got {rows_per_batch}")
    if not samples:
        return []
    lengths = [len(s) for s in samples]
    sources = [
        f"rollout of {s.record.source}" if s.record is not None and s.record.source else f"rollout sample {i}"
        for i, s in enumerate(samples)
    ]
    rows = pack_lengths(lengths, max_length, sources=sources)
    batches = []
    for b in range(0, len(rows), rows_per_batch):
        chunk = rows[b : b + rows_per_batch]
        batches.append(collate_rows([[samples[i] for i in row] for row in chunk], pad_token_id, indices=chunk))
    return batches


__all__ = ["pack_rollout_samples"]
