"""Coord vocabulary: one token each, contiguous ids, resize never shrinks, smooth init (docs/DATA.md)."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from model.tiny import QWEN_SPECIAL_TOKENS, build_tiny_in_memory, build_tiny_tokenizer
from model.vocab import (
    CoordVocab,
    coord_init_rows,
    coord_vocab_from_tokenizer,
    ensure_coord_tokens,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "qwen_tokenizer")


def test_coord_vocab_mapping():
    v = CoordVocab(first_id=100)
    assert v.ids.tolist() == list(range(100, 1100))
    assert v.token_id(0) == 100 and v.token_id(999) == 1099
    assert v.bin_of(100) == 0 and v.bin_of(1099) == 999 and v.bin_of(99) == -1 and v.bin_of(1100) == -1
    ids = torch.tensor([[99, 100, 555], [1099, 1100, 0]])
    assert v.is_coord(ids).tolist() == [[False, True, True], [True, False, False]]
    assert v.bins(ids).tolist() == [[-1, 0, 455], [999, -1, -1]]
    with pytest.raises(ValueError, match="0..999"):
        v.token_id(1000)


def test_tiny_tokenizer_layout():
    tok = build_tiny_tokenizer()
    v = coord_vocab_from_tokenizer(tok)
    first_special = tok.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS[0])
    # regular BPE, then the 26 specials in Qwen order, then the 1000 coord tokens
    assert tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(first_special, first_special + 26))
    assert v.first_id == first_special + 26 and len(tok) == v.end_id
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    ids = tok("[<|coord_7|>, <|coord_999|>]", add_special_tokens=False)["input_ids"]
    assert [v.bin_of(i) for i in ids if v.bin_of(i) >= 0] == [7, 999]
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    assert (
        tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<|im_start|>user\nx<|im_end|>\n"
    )


@functools.lru_cache(maxsize=1)
def _real_qwen_with_specials():
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    return tok


def test_real_qwen_tokenizer_gets_coord_ids_from_151669():
    import copy

    tok = copy.deepcopy(_real_qwen_with_specials())
    assert len(tok) == 151669
    v, added = ensure_coord_tokens(tok)
    assert added and v == CoordVocab(151669) and len(tok) == 151669 + 1000
    ids = tok('"bbox_2d": [<|coord_110|>, <|coord_310|>]', add_special_tokens=False)["input_ids"]
    assert 151669 + 110 in ids and 151669 + 310 in ids
    v2, added2 = ensure_coord_tokens(tok)  # idempotent
    assert v2 == v and not added2 and len(tok) == 152669


def test_missing_partial_and_noncontiguous_coord_tokens_fail():
    from tokenizers import AddedToken

    from data.coordjson import coord_token_texts

    _, bare, _ = build_tiny_in_memory(coord_tokens=False)
    with pytest.raises(ValueError, match="lacks 1000"):
        coord_vocab_from_tokenizer(bare)
    _, partial, _ = build_tiny_in_memory(coord_tokens=False)
    partial.add_tokens([AddedToken("<|coord_5|>", special=True, normalized=False)], special_tokens=True)
    with pytest.raises(ValueError, match="lacks 999"):
        ensure_coord_tokens(partial)
    _, shuffled, _ = build_tiny_in_memory(coord_tokens=False)
    texts = coord_token_texts()
    texts[3], texts[4] = texts[4], texts[3]
    shuffled.add_tokens([AddedToken(t, special=True, normalized=False) for t in texts], special_tokens=True)
    with pytest.raises(ValueError, match="not contiguous"):
        coord_vocab_from_tokenizer(shuffled)
    _, split, _ = build_tiny_in_memory(coord_tokens=False)
    # plain (non-special) added tokens would be fine; a tokenizer that never added them splits them
    assert len(split("<|coord_5|>", add_special_tokens=False)["input_ids"]) > 1


def test_grow_keeps_old_rows_and_sizes_both_tables():
    model, tok, _ = build_tiny_in_memory(coord_tokens=False, row_multiple=64)
    rows0 = model.get_input_embeddings().weight.shape[0]
    assert rows0 < len(tok) + 1000  # the tokenizer will outgrow the table
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    v, added = ensure_coord_tokens(tok, model)
    assert added
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert emb.shape[0] == head.shape[0] == len(tok) == v.end_id
    assert model.config.text_config.vocab_size == len(tok)
    # rows of the existing vocabulary are kept; the unused rows the coord ids land on are re-initialised
    assert v.first_id < rows0
    assert torch.equal(emb[: v.first_id], emb0[: v.first_id]) and torch.equal(head[: v.first_id], head0[: v.first_id])
    assert torch.isfinite(emb[v.first_id : v.end_id]).all() and torch.isfinite(head[v.first_id : v.end_id]).all()


def test_resize_never_shrinks():
    model, tok, _ = build_tiny_in_memory(coord_tokens=False, row_multiple=2048)
    rows0 = model.get_input_embeddings().weight.shape[0]
    assert rows0 == 2048 * 2 and rows0 > len(tok) + 1000  # like Qwen's 151,936 rows
    emb0 = model.get_input_embeddings().weight.detach().clone()
    v, added = ensure_coord_tokens(tok, model)
    emb = model.get_input_embeddings().weight
    assert added and emb.shape[0] == rows0 and model.lm_head.weight.shape[0] == rows0
    assert torch.equal(emb[: v.first_id], emb0[: v.first_id])
    assert torch.equal(emb[v.end_id :], emb0[v.end_id :])  # rows past the tokenizer untouched too
    assert not torch.equal(emb[v.first_id : v.end_id], emb0[v.first_id : v.end_id])  # coord rows initialised

    # A prepared checkpoint (tokens present, enough rows) is left exactly as it is.
    model2, tok2, _ = build_tiny_in_memory(coord_tokens=True)
    before = {k: p.detach().clone() for k, p in model2.named_parameters()}
    v2, added2 = ensure_coord_tokens(tok2, model2)
    assert not added2
    assert all(torch.equal(p, before[k]) for k, p in model2.named_parameters())


def test_sincos_distances_match_closed_form():
    """Projection is orthonormal, so ||e_k - e_k'|| = scale * typical * ||f(k) - f(k')|| with
    ||f(k)-f(k')||^2 = (2/F) * sum_m (1 - cos(pi m (k-k')/999)), F frequencies (independent formula)."""
    torch.manual_seed(1)
    H = 64
    ref = torch.randn(300, H) * 0.05 + 0.3
    rows = coord_init_rows(ref, init="sincos", scale=0.5).double()
    mu = ref.double().mean(0)
    typical = float((ref.double() - mu).norm(dim=1).mean())
    F = 8

    def expected(d):
        return 0.5 * typical * math.sqrt(2 / F * sum(1 - math.cos(math.pi * m * d / 999) for m in range(1, F + 1)))

    for k, d in [(0, 1), (10, 10), (400, 100), (0, 999), (123, 500)]:
        got = float((rows[k] - rows[k + d]).norm())
        assert got == pytest.approx(expected(d), rel=1e-4)
    # mean of the coord rows stays near the reference mean; each row sits 0.5*typical from it
    assert float((rows - mu).norm(dim=1).mean()) == pytest.approx(0.5 * typical, rel=1e-4)


def test_smooth_init_neighbours_closer_than_distant_bins():
    model, tok, _ = build_tiny_in_memory(coord_tokens=False)
    v, _ = ensure_coord_tokens(tok, model, init="sincos")
    for table in (model.get_input_embeddings().weight, model.lm_head.weight):
        E = table[v.first_id : v.end_id].detach().double()
        d1 = (E[1:] - E[:-1]).norm(dim=1)  # neighbours
        d50 = (E[50:] - E[:-50]).norm(dim=1)
        d300 = (E[300:] - E[:-300]).norm(dim=1)
        assert (d1[:-49] < d50).all()
        assert d1.mean() < d50.mean() < d300.mean()
        cos = torch.nn.functional.cosine_similarity
        assert (cos(E[:-1], E[1:]) > cos(E[:-500], E[500:]).max()).all()
    # input and LM-head rows are initialised independently (untied tables)
    assert not torch.equal(
        model.get_input_embeddings().weight[v.first_id : v.end_id], model.lm_head.weight[v.first_id : v.end_id]
    )


def test_mean_and_random_inits():
    torch.manual_seed(0)
    ref = torch.randn(500, 32) * 0.1 + 1.0
    mean_rows = coord_init_rows(ref, init="mean")
    assert (mean_rows - ref.mean(0)).abs().max() < 1e-2
    rand_rows = coord_init_rows(ref, init="random")
    assert rand_rows.std(0).mean() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(coord_init_rows(ref, init="random"), rand_rows)  # deterministic
    with pytest.raises(ValueError, match="coord_init"):
        coord_init_rows(ref, init="zeros")


def test_tied_embeddings_init_once():
    model, tok, _ = build_tiny_in_memory(coord_tokens=False, tie_word_embeddings=True)
    v, _ = ensure_coord_tokens(tok, model)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    E = model.get_input_embeddings().weight[v.first_id : v.end_id]
    assert (E[1:] - E[:-1]).norm(dim=1).mean() < (E[100:] - E[:-100]).norm(dim=1).mean()


def test_real_qwen_layout_resize_from_151936_rows():
    """Real Qwen3-VL: 151,669 tokenizer entries, 151,936 rows; coord ids 151669..152668 -> 152,669 rows."""
    import copy

    from transformers import Qwen3VLForConditionalGeneration

    from model.tiny import tiny_qwen3vl_config

    tok = copy.deepcopy(_real_qwen_with_specials())
    cfg = tiny_qwen3vl_config(
        tok, hidden=32, heads=2, kv_heads=1, intermediate=32, layers=1, vision_depth=1, vocab_size=151936
    )
    assert cfg.image_token_id == 151655 and cfg.vision_start_token_id == 151652
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg)
    emb0 = model.get_input_embeddings().weight[:151669].detach().clone()
    v, added = ensure_coord_tokens(tok, model)
    assert added and v.first_id == 151669
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 152669
    assert torch.equal(model.get_input_embeddings().weight[:151669], emb0)
    E = model.get_input_embeddings().weight[v.first_id : v.end_id].detach()
    assert (E[1:] - E[:-1]).norm(dim=1).mean() < (E[100:] - E[:-100]).norm(dim=1).mean()
