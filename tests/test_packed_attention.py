"""sdpa_packed (model/packed_attention.py): segments found by hand, attention and its gradients equal to a
softmax with the block-diagonal causal mask written out here, and every other call left to sdpa."""

from __future__ import annotations

import math

import pytest
import torch

from model import packed_attention as pa


class _Causal(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2  # 4 query heads, 2 key/value heads (read by transformers' sdpa)


class _Bidirectional(_Causal):
    is_causal = False


# row 0: samples of 3 and 2 tokens, then 3 pad tokens (position 0 each: one-token segments);
# row 1: samples of 6 and 2 tokens.
POS = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1]])
SEGMENTS = [[0, 1, 2], [3, 4], [5], [6], [7], [8, 9, 10, 11, 12, 13], [14, 15]]  # flat positions b * 8 + t


def test_segments_by_hand():
    seg = pa.packed_segments(POS)
    assert (seg.batch, seg.length) == (2, 8)
    found = []
    for index, valid in seg.buckets:
        lengths = valid.reshape(index.shape).sum(1).tolist()
        found += [index[i, :n].tolist() for i, n in enumerate(lengths)]
        longest = max(lengths)
        assert index.shape[1] == longest and all(longest <= math.ceil(n * pa.BUCKET_RATIO) for n in lengths)
    assert sorted(found) == sorted(SEGMENTS)
    placed = torch.cat([index.reshape(-1)[valid] for index, valid in seg.buckets])
    assert placed[seg.order].tolist() == list(range(16))  # order puts every position back
    # a row always starts a segment, even when its first position continues the previous row's last
    assert pa.packed_segments(torch.tensor([[0, 1], [2, 3]])).order.numel() == 4
    assert sorted(len(i[0]) for i, _ in pa.packed_segments(torch.tensor([[0, 1], [2, 3]])).buckets) == [2]


def _reference(q, k, v, scale):
    """softmax(q k^T * scale + block-diagonal causal mask) v, kv heads repeated for GQA; [B, T, Hq, D]."""
    b, hq, t, d = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    seg_id = torch.empty(b * t, dtype=torch.long)
    for i, members in enumerate(SEGMENTS):
        seg_id[members] = i
    seg_id = seg_id.reshape(b, t)
    allowed = (seg_id[:, :, None] == seg_id[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def test_attention_and_gradients_equal_the_masked_softmax():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 8, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 8, 6, dtype=torch.float64, requires_grad=True)
    seg = pa.packed_segments(POS)
    out, weights = pa.sdpa_packed_attention_forward(_Causal(), q, k, v, None, scaling=0.3,
                                                    **{pa.SEGMENTS_KWARG: seg})
    assert weights is None and out.shape == (2, 8, 4, 6)
    ref = _reference(q, k, v, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("case", ["no_segments", "not_causal", "cached_keys", "other_batch"])
def test_every_other_call_is_plain_sdpa(case, monkeypatch):
    """Vision tower (not causal), generation (keys longer than queries, padding mask), a batch the
    segments were not made for: transformers' sdpa with the mask it was given."""
    from transformers.integrations import sdpa_attention

    calls = []
    real = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append(kw)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    torch.manual_seed(1)
    t_k = 10 if case == "cached_keys" else 8
    q, k, v = torch.randn(2, 4, 8, 6), torch.randn(2, 2, t_k, 6), torch.randn(2, 2, t_k, 6)
    mask = torch.rand(2, 1, 8, t_k) > 0.3
    mask[..., 0] = True
    module = _Bidirectional() if case == "not_causal" else _Causal()
    kwargs = {} if case == "no_segments" else {pa.SEGMENTS_KWARG: pa.packed_segments(POS)}
    if case == "other_batch":
        kwargs = {pa.SEGMENTS_KWARG: pa.packed_segments(POS[:1])}
    out, _ = pa.sdpa_packed_attention_forward(module, q, k, v, mask, scaling=0.5, **kwargs)
    want, _ = real(module, q, k, v, mask, scaling=0.5)
    assert len(calls) == 1 and pa.SEGMENTS_KWARG not in calls[0]
    torch.testing.assert_close(out, want)


def test_register_makes_it_a_transformers_implementation():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    pa.register()
    pa.register()  # idempotent
    assert AttentionInterface()[pa.NAME] is pa.sdpa_packed_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[pa.NAME] is sdpa_mask
