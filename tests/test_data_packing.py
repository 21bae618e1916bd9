"""Static packing: first-fit-decreasing by hand, collation layout, resumable deterministic batches."""

from __future__ import annotations

import pytest
import torch

from core.vocab import COORD, EOS, IGNORE, STRUCT
from data.packing import PackedDataset, PackingError, collate_rows, pack_lengths, pack_samples
from data.types import BBoxGroup, EncodedSample, GTObject, Record


def _sample(n: int, tag: int, prompt_len: int = 2, n_patches: int = 4, dropped: bool = False) -> EncodedSample:
    """A fake sample of ``n`` tokens whose ids are ``tag*100 + position``; coord tokens at 2..5 if room."""
    ids = torch.arange(n) + 100 * tag
    types = torch.full((n,), STRUCT)
    types[:prompt_len] = IGNORE
    types[-1] = EOS
    groups = []
    coord_targets = torch.full((n,), -1)
    if n >= prompt_len + 5:
        pos = tuple(range(prompt_len, prompt_len + 4))
        types[list(pos)] = COORD
        coord_targets[list(pos)] = torch.tensor([1, 2, 3, 4]) + tag
        groups.append(BBoxGroup(pos, (1 + tag, 2 + tag, 3 + tag, 4 + tag), -1, 0))
    mm = torch.zeros(n, dtype=torch.long)
    mm[1] = 1
    rec = Record(f"/x/{tag}.png", 8, 8, (GTObject("a", (0, 0, 1, 1)),), str(tag), f"d.jsonl:{tag + 1}")
    return EncodedSample(
        input_ids=ids,
        token_types=types,
        object_index=torch.full((n,), -1),
        subset=torch.full((n,), -1),
        coord_targets=coord_targets,
        closure=torch.zeros(n, dtype=torch.bool),
        mm_token_type_ids=mm,
        pixel_values=torch.full((n_patches, 3), float(tag)),
        image_grid_thw=torch.tensor([[1, 2, n_patches // 2]]),
        prompt_len=prompt_len,
        bbox_groups=groups,
        dropped_invalid=dropped,
        record=rec,
    )


def test_pack_lengths_first_fit_decreasing_by_hand():
    # sorted desc (ties by index): 7(i1), 5(i0), 4(i3), 3(i2), 2(i4), 1(i5); bins of 10:
    # 7 -> [i1]; 5 -> new [i0]; 4 -> fits i0 bin (5+4=9); 3 -> i1 bin (10); 2 -> new; 1 -> i0 bin (10)
    assert pack_lengths([5, 7, 3, 4, 2, 1], 10) == [[1, 2], [0, 3, 5], [4]]
    assert pack_lengths([], 10) == []
    assert pack_lengths([10, 10], 10) == [[0], [1]]


def test_pack_lengths_deterministic_and_within_budget():
    import random

    lengths = [random.Random(3).randint(1, 50) for _ in range(200)]
    a, b = pack_lengths(lengths, 64), pack_lengths(list(lengths), 64)
    assert a == b
    assert sorted(i for bin_ in a for i in bin_) == list(range(200))
    assert all(sum(lengths[i] for i in bin_) <= 64 for bin_ in a)


def _first_fit_decreasing_by_scan(lengths, max_length):
    """Reference: scan every open bin for each sample (the textbook first fit, O(samples x bins))."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(max_length - lengths[i])
    return bins


def test_pack_lengths_tree_search_equals_the_bin_scan():
    import random

    for seed in range(300):
        rnd = random.Random(seed)
        max_length = rnd.choice([1, 5, 17, 100, 512])
        lengths = [rnd.randint(1, max_length) for _ in range(rnd.randint(0, 200))]
        assert pack_lengths(lengths, max_length) == _first_fit_decreasing_by_scan(lengths, max_length), seed


def test_too_long_sample_names_length_and_source():
    with pytest.raises(PackingError, match=r"sample 1 \(b.jsonl:2\) has 11 tokens > training.max_length=10"):
        pack_lengths([3, 11], 10, sources=["b.jsonl:1", "b.jsonl:2"])
    with pytest.raises(PackingError, match="d.jsonl:2"):
        pack_samples([_sample(5, 0), _sample(12, 1)], 10)
    with pytest.raises(PackingError, match="has 12 tokens"):
        PackedDataset([_sample(5, 0), _sample(12, 1)], 10, 1, packing=False)


def test_collate_rows_layout():
    a, b, c = _sample(8, 1, dropped=True), _sample(4, 2), _sample(9, 3)
    batch = collate_rows([[a, b], [c]], pad_token_id=0)
    assert batch.shape == (2, 12)
    assert batch.input_ids[0].tolist() == list(range(100, 108)) + list(range(200, 204))
    assert batch.input_ids[1].tolist() == list(range(300, 309)) + [0, 0, 0]
    assert batch.segment_ids.tolist() == [[0] * 8 + [1] * 4, [0] * 9 + [-1] * 3]
    assert batch.text_position_ids.tolist() == [list(range(8)) + list(range(4)), list(range(9)) + [-1] * 3]
    assert batch.token_types[1, 9:].tolist() == [IGNORE] * 3
    assert batch.dropped_invalid.tolist() == [[True] * 8 + [False] * 4, [False] * 9 + [False] * 3]
    assert batch.mm_token_type_ids.sum() == 3
    # pixel values row-major in segment order: a (tag 1), b (tag 2), c (tag 3)
    assert batch.pixel_values[:, 0].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    assert batch.image_grid_thw.tolist() == [[1, 2, 2]] * 3
    assert [(s.row, s.start, s.length, s.sample_index, s.prompt_len, s.image_rows) for s in batch.segments] == [
        (0, 0, 8, 0, a.prompt_len, 1),
        (0, 8, 4, 1, b.prompt_len, 1),
        (1, 0, 9, 2, c.prompt_len, 1),
    ]
    assert batch.num_tokens == 21 and not hasattr(batch, "samples")  # no samples travel with the batch
    # indices: each sample's index in the sequence it came from (a PackedDataset batch: the training set)
    again = collate_rows([[a, b], [c]], pad_token_id=0, indices=[[7, 3], [5]])
    assert [s.sample_index for s in again.segments] == [7, 3, 5]
    with pytest.raises(PackingError, match="indices"):
        collate_rows([[a, b], [c]], pad_token_id=0, indices=[[7], [5]])
    # b has no box (too short); a's coords at 2..5 in row 0, c's at 2..5 in row 1 -> 12 + 2..5
    assert [g.coord_pos for g in batch.bbox_groups] == [(2, 3, 4, 5), (14, 15, 16, 17)]
    flat_targets = batch.coord_targets.flatten()
    for g in batch.bbox_groups:
        assert flat_targets[list(g.coord_pos)].tolist() == list(g.target_bins)
    with pytest.raises(PackingError):
        collate_rows([[a], []], pad_token_id=0)


def _ids(batches):
    return [[[int(s.input_ids[0]) // 100 for s in row] for row in batch] for batch in batches]


def test_packed_dataset_deterministic_resumable_and_sharded():
    samples = [_sample(3 + (i % 5), i) for i in range(20)]
    ds = PackedDataset(samples, 16, 2, packing=True, seed=7)
    assert all(sum(len(samples[i]) for i in row) <= 16 for row in ds.rows)
    epoch0 = _ids(list(ds))
    assert len(epoch0) == len(ds) and ds.state_dict()["epoch"] == 1
    epoch1 = _ids(list(ds))
    assert epoch0 != epoch1  # reshuffled per epoch
    assert sorted(i for b in epoch0 for row in b for i in row) == list(range(20))

    again = PackedDataset(samples, 16, 2, packing=True, seed=7)
    assert _ids(list(again)) == epoch0  # same seed, same rows, same order

    # resume after 2 batches of epoch 0
    src = PackedDataset(samples, 16, 2, packing=True, seed=7)
    it = iter(src)
    first = [next(it), next(it)]
    state = src.state_dict()
    resumed = PackedDataset(samples, 16, 2, packing=True, seed=7)
    resumed.load_state_dict(state)
    assert _ids(first) + _ids(list(resumed)) == epoch0
    with pytest.raises(PackingError, match="max_length"):
        PackedDataset(samples, 32, 2, packing=True, seed=7).load_state_dict(state)

    # two ranks: disjoint batches, same count, union = the single-rank order minus a dropped tail
    r0 = PackedDataset(samples, 16, 2, packing=True, seed=7, num_replicas=2, rank=0)
    r1 = PackedDataset(samples, 16, 2, packing=True, seed=7, num_replicas=2, rank=1)
    assert len(r0) == len(r1) == len(epoch0) // 2
    assert r0.dropped_batches == len(epoch0) % 2
    b0, b1 = _ids(list(r0)), _ids(list(r1))
    assert [x for pair in zip(b0, b1) for x in pair] == epoch0[: 2 * len(r0)]


def test_unpacked_rows_are_single_samples():
    samples = [_sample(4, i) for i in range(5)]
    ds = PackedDataset(samples, 16, 2, packing=False, shuffle=False)
    assert _ids(list(ds)) == [[[0], [1]], [[2], [3]], [[4]]]
    assert _ids([ds[1]]) == [[[2], [3]]]


def test_iterate_batches_workers_match_in_process_and_resume(tmp_path):
    """Loader workers hand out the same collated batches in the same order as the training process,
    across an epoch boundary, and a dataset restored from a mid-epoch state continues identically."""
    import itertools

    from data.packing import iterate_batches

    samples = [_sample(n, i) for i, n in enumerate([7, 5, 9, 4, 6, 8, 3])]
    def make():
        return PackedDataset(samples, max_length=16, batch_size=1, packing=True, seed=3)

    def take(ds, n, workers):
        return [b.input_ids.tolist() for b in itertools.islice(iterate_batches(ds, 0, num_workers=workers), n)]

    n = len(make()) + 2  # crosses into the next epoch
    a, b = make(), make()
    assert take(a, n, 0) == take(b, n, 2)
    assert a.state_dict() == b.state_dict()

    full = take(make(), n, 0)
    first = make()
    take(first, 2, 0)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, n - 2, 2) == full[2:]
