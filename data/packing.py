"""Static packing: deterministic bins of samples, collation of packed rows, a resumable batch dataset.

A packed row holds several samples back to back ("segments"); attention and position ids are
segment-local (model.forward builds them from ``segment_ids``/``text_position_ids``), so a packed
row gives the same per-token logits as the samples alone. Packing is static: bins are decided
once from the sample lengths, never on the fly, so every epoch and every resume sees the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from configs.errors import UserError
from core.vocab import IGNORE, NO_SUBSET
from data.records import DataError
from data.types import BBoxGroup, EncodedSample, PackedBatch, Segment


class PackingError(UserError, ValueError):
    pass


def pack_lengths(lengths: Sequence[int], max_length: int, *, sources: Sequence[str] | None = None) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices, each bin's total length ``<= max_length``.

    Deterministic: samples are sorted by length descending, ties by index; bins are returned in
    the order they were opened and list their indices in insertion order. A sample longer than
    ``max_length`` raises ``PackingError`` with its index, length and source.
    """
    if max_length <= 0:
        raise PackingError(f"training.max_length must be a positive integer, got {max_length}")
    for i, n in enumerate(lengths):
        if n > max_length:
            src = f" ({sources[i]})" if sources is not None else ""
            raise PackingError(
                f"sample {i}{src} has {n} tokens > training.max_length={max_length}; raise training.max_length, "
                "lower data.max_pixels, or cap objects with data.max_objects"
            )
        if n <= 0:
            raise PackingError(f"sample {i} has length {n}; every sample needs at least one token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    # First fit in O(log bins) per sample instead of a scan of every open bin (minutes at 1e5
    # samples, hours at 1e6): a max-tree over the free room of bin slots 0..n-1. Slots not opened
    # yet hold max_length, so the leftmost slot with room >= n is the first open bin that fits or,
    # when none does, the next new bin: exactly the first-fit choice.
    size = 1
    while size < max(len(order), 1):
        size *= 2
    room = [0] * size + [max_length] * size  # leaves at size..2*size-1; slots past n are never reached
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= n
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([i])
        else:
            bins[b].append(i)
        room[node] -= n
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_samples(samples: Sequence[EncodedSample], max_length: int) -> list[list[int]]:
    """``pack_lengths`` on encoded samples (sources taken from their records)."""
    sources = [s.record.source if s.record is not None else "" for s in samples]
    return pack_lengths([len(s) for s in samples], max_length, sources=sources)


def collate_rows(
    rows: Sequence[Sequence[EncodedSample]],
    pad_token_id: int,
    *,
    indices: Sequence[Sequence[int]] | None = None,
) -> PackedBatch:
    """Collate packed rows (each inner list = one row of segments) into a right-padded ``PackedBatch``.

    Shapes: per-token tensors ``[B, T]`` with ``T`` = the longest row. Padding: ``input_ids`` =
    ``pad_token_id``, ``token_types`` IGNORE, ``object_index``/``coord_targets`` -1, ``subset``
    NO_SUBSET, ``segment_ids``/``text_position_ids`` -1, ``dropped_invalid`` False. Images are
    concatenated row-major in segment order; ``bbox_groups`` get flat positions ``row * T + pos``.
    ``indices`` (same shape as ``rows``): each sample's index in the sequence it came from, kept as
    ``Segment.sample_index``; default: its position in the collated order.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise PackingError("collate_rows needs at least one row and no empty rows")
    if indices is not None and [len(r) for r in indices] != [len(r) for r in rows]:
        raise PackingError(f"collate_rows: indices {[len(r) for r in indices]} do not match rows {[len(r) for r in rows]}")
    B = len(rows)
    T = max(sum(len(s) for s in r) for r in rows)

    def full(value, dtype):
        return torch.full((B, T), value, dtype=dtype)

    out = {
        "input_ids": full(pad_token_id, torch.long),
        "token_types": full(IGNORE, torch.long),
        "object_index": full(-1, torch.long),
        "subset": full(NO_SUBSET, torch.long),
        "coord_targets": full(-1, torch.long),
        "closure": full(False, torch.bool),
        "dropped_invalid": full(False, torch.bool),
        "mm_token_type_ids": full(0, torch.long),
        "segment_ids": full(-1, torch.long),
        "text_position_ids": full(-1, torch.long),
    }
    per_token = ("input_ids", "token_types", "object_index", "subset", "coord_targets", "closure", "mm_token_type_ids")
    segments: list[Segment] = []
    groups: list[BBoxGroup] = []
    pixels: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = len(s)
            sl = slice(start, start + n)
            for name in per_token:
                out[name][r, sl] = getattr(s, name)
            out["dropped_invalid"][r, sl] = bool(s.dropped_invalid)
            out["segment_ids"][r, sl] = k
            out["text_position_ids"][r, sl] = torch.arange(n)
            image_rows = 0
            if s.pixel_values is not None and s.pixel_values.numel():
                pixels.append(s.pixel_values)
                grids.append(s.image_grid_thw.reshape(-1, 3))
                image_rows = grids[-1].shape[0]
            index = len(segments) if indices is None else int(indices[r][k])
            segments.append(Segment(row=r, start=start, length=n, sample_index=index, prompt_len=s.prompt_len,
                                    image_rows=image_rows))
            for g in s.bbox_groups:
                flat = tuple(r * T + start + p for p in g.coord_pos)
                groups.append(BBoxGroup(flat, g.target_bins, g.subset, g.object_index))
            start += n
    pixel_values = torch.cat(pixels) if pixels else torch.zeros(0)
    image_grid_thw = torch.cat(grids).to(torch.long) if grids else torch.zeros(0, 3, dtype=torch.long)
    return PackedBatch(
        **out,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        segments=segments,
        bbox_groups=groups,
    )


class PackedDataset(torch.utils.data.Dataset):
    """Batches of packed rows for static packing, deterministic per (seed, epoch), resumable.

    samples:    ``Sequence[EncodedSample]`` (may be lazy, e.g. ``data.encoding.EncodedRecords``)
    max_length: row budget in tokens (``training.max_length``)
    batch_size: rows per batch
    packing:    True -> first-fit-decreasing rows of several samples; False -> one sample per row
    lengths:    sample lengths if known without encoding (``EncodedRecords.lengths()``); else read
    rows:       a precomputed plan for these lengths (``data.table.cached_packing``); else computed here
    num_replicas/rank: DDP sharding; each rank takes batches ``rank, rank + R, ...`` and every rank
                gets the same number of batches (the last incomplete round is dropped and counted
                in ``dropped_batches``)

    Item ``i`` (and each step of iteration) is a list of rows, each a list of ``EncodedSample``,
    ready for ``collate_rows``. Rows (not samples) are shuffled with ``Random(seed + epoch)``.
    Iteration starts at the resume position and advances it; ``state_dict``/``load_state_dict``
    save and restore ``(epoch, position)``.
    """

    def __init__(
        self,
        samples: Sequence[EncodedSample],
        max_length: int,
        batch_size: int,
        packing: bool,
        *,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Sequence[int] | None = None,
        sources: Sequence[str] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        rows: Sequence[Sequence[int]] | None = None,
    ):
        if batch_size <= 0:
            raise PackingError(f"training.batch_size must be a positive integer, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise PackingError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.samples = samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        if lengths is None:
            lengths = [len(s) for s in samples]
        if len(lengths) != len(samples):
            raise PackingError(f"{len(lengths)} lengths for {len(samples)} samples")
        self.lengths = lengths  # token length of each sample (the record cache's, when the recipes pass them)
        if rows is not None:
            self.rows = [list(r) for r in rows]
            if sorted(i for r in self.rows for i in r) != list(range(len(lengths))):
                raise PackingError(f"the packing plan does not hold each of the {len(lengths)} samples exactly once")
        elif packing:
            self.rows = pack_lengths(lengths, max_length, sources=sources)
        else:
            pack_lengths(lengths, max_length, sources=sources)  # same too-long check
            self.rows = [[i] for i in range(len(lengths))]
        self.epoch = 0
        self.position = 0  # batches of this rank already consumed in ``epoch``
        n_batches = -(-len(self.rows) // batch_size)
        self.dropped_batches = n_batches % num_replicas
        self._len = n_batches // num_replicas
        if self._len == 0:
            raise PackingError(
                f"{len(self.rows)} rows give no batch for {num_replicas} ranks at batch_size={batch_size}; "
                "use more data or fewer ranks"
            )

    def __len__(self) -> int:
        return self._len

    def _order(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return batches[self.rank : self._len * self.num_replicas : self.num_replicas]

    def batch_indices(self, i: int, epoch: int | None = None) -> list[list[int]]:
        """Sample indices of batch ``i``: one inner list per row."""
        rows = self._order(self.epoch if epoch is None else epoch)[i]
        return [list(self.rows[r]) for r in rows]

    def __getitem__(self, i: int) -> list[list[EncodedSample]]:
        return [[self.samples[j] for j in row] for row in self.batch_indices(i)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def __iter__(self) -> Iterator[list[list[EncodedSample]]]:
        """Yield the remaining batches of the current epoch, then move to the next epoch."""
        return self.epoch_items()

    def epoch_items(self, items: Iterator | None = None) -> Iterator:
        """Hand out the rest of the current epoch, advancing ``position`` as each item leaves, then
        move to the next epoch. The one place the resume position moves.

        ``items`` yields batch ``i``'s item for ``i = position, position + 1, ...`` (e.g. collated
        batches from loader workers, see :func:`iterate_batches`); default: the batches' rows.
        """
        epoch, order = self.epoch, range(self.position, self._len)
        if items is None:
            items = (self[i] for i in order)
        for i, item in zip(order, items):
            self.position = i + 1  # advance first: a checkpoint taken after this batch resumes after it
            yield item
        self.set_epoch(epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows", len(self.rows)) != len(self.rows):
            raise PackingError(
                f"resume state has {state['num_rows']} packed rows but this dataset packs {len(self.rows)}; "
                "the data, max_length or packing setting changed since the checkpoint"
            )
        if state.get("seed", self.seed) != self.seed:
            raise PackingError(f"resume state seed {state['seed']} != data seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``i`` of one epoch of a ``PackedDataset``, encoded and collated (runs in loader workers).

    ``skip_invalid`` (``data.skip_invalid``): a sample whose encoding raises ``DataError`` (an image cut
    short or corrupt after its header, found only when decoded) is left out of its row and its message
    kept in ``PackedBatch.skipped`` (counted as ``data/skipped_samples_total``); otherwise it raises."""

    def __init__(self, dataset: PackedDataset, epoch: int, pad_token_id: int, skip_invalid: bool = False):
        self.dataset, self.epoch, self.pad_token_id = dataset, epoch, pad_token_id
        self.skip_invalid = skip_invalid

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> PackedBatch:
        samples = self.dataset.samples
        rows, indices, skipped = [], [], []
        for row in self.dataset.batch_indices(i, self.epoch):
            kept = []
            for j in row:
                try:
                    kept.append((j, samples[j]))
                except DataError as e:
                    if not self.skip_invalid:
                        raise
                    skipped.append(e)
            if kept:
                indices.append([j for j, _ in kept])
                rows.append([sample for _, sample in kept])
        if not rows:  # nothing left to train on in this micro-batch: the first error stops the run
            raise skipped[0]
        # Segment.sample_index = the record's index in the training set: a Rollout step looks the
        # records up there instead of receiving them (and their image tensors) a second time.
        batch = collate_rows(rows, self.pad_token_id, indices=indices)
        batch.skipped = tuple(str(e) for e in skipped)
        return batch


def _as_is(batch):
    return batch


def iterate_batches(dataset: PackedDataset, pad_token_id: int, *, num_workers: int = 0,
                    skip_invalid: bool = False) -> Iterator[PackedBatch]:
    """Collated micro-batches of ``dataset`` forever, from its current ``(epoch, position)`` on.

    ``num_workers > 0`` (``data.num_workers``) decodes images, runs the image processor and
    collates in DataLoader worker processes, prefetching ahead of the training step; the order is
    the same as with 0 workers. ``dataset.position`` advances as each batch is handed out, so a
    checkpoint taken after a step resumes right after it. ``skip_invalid``: see :class:`_EpochBatches`.
    """
    if num_workers < 0:
        raise PackingError(f"data.num_workers must be >= 0, got {num_workers}")
    while True:
        view = _EpochBatches(dataset, dataset.epoch, pad_token_id, skip_invalid)
        order = list(range(dataset.position, len(dataset)))
        if num_workers > 0 and order:
            loader = torch.utils.data.DataLoader(
                view, batch_size=None, sampler=order, num_workers=num_workers, collate_fn=_as_is
            )
            batches: Iterator[PackedBatch] = iter(loader)
        else:
            batches = (view[i] for i in order)
        yield from dataset.epoch_items(batches)
