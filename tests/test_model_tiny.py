"""The tiny random Qwen3-VL builder: deterministic, Qwen-shaped config, fast."""

from __future__ import annotations

import time

import pytest
import torch

from model.tiny import (
    build_tiny_image_processor,
    build_tiny_in_memory,
    build_tiny_tokenizer,
    tiny_qwen3vl_config,
    tiny_tokenizer_is_current,
    train_tiny_tokenizer,
)


def test_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = '{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}]}'
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert ids == b(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text  # byte-level BPE round-trips exactly


def test_committed_tokenizer_matches_a_fresh_training():
    # model/tiny_tokenizer.json is what train_tiny_tokenizer() produces; regenerate it with
    # `python scripts/make_tiny_tokenizer.py` when the corpus or the special tokens change.
    assert tiny_tokenizer_is_current(), "stale model/tiny_tokenizer.json: run python scripts/make_tiny_tokenizer.py"
    loaded, trained = build_tiny_tokenizer(), train_tiny_tokenizer()
    assert loaded.get_vocab() == trained.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.chat_template) == (
        trained.pad_token,
        trained.eos_token,
        trained.chat_template,
    )


def test_config_is_qwen_shaped():
    tok = build_tiny_tokenizer()
    cfg = tiny_qwen3vl_config(tok, hidden=64, heads=4)
    tc, vc = cfg.text_config, cfg.vision_config
    ids = tok.convert_tokens_to_ids
    assert (cfg.image_token_id, cfg.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids("<|vision_start|>"), ids("<|vision_end|>"))
    assert sum(tc.rope_parameters["mrope_section"]) == tc.head_dim // 2 == 8
    assert all(0 <= i < vc.depth for i in vc.deepstack_visual_indexes)
    assert tc.vocab_size > len(tok) and tc.vocab_size % 64 == 0
    assert vc.out_hidden_size == tc.hidden_size
    assert (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size) == (16, 2, 2)


def test_init_std_sets_the_std_of_every_random_weight():
    # Linear/Embedding weights are N(0, init_std) in both towers; 0.02 (the default) is Qwen3-VL's
    # initializer_range, so the default build is the one every test and checkpoint already had.
    def stds(model):
        lm, vis = model.model.language_model, model.model.visual
        weights = [lm.embed_tokens.weight, lm.layers[0].self_attn.q_proj.weight, lm.layers[1].mlp.up_proj.weight,
                   vis.blocks[0].attn.qkv.weight, model.lm_head.weight]
        return [float(w.std()) for w in weights]

    assert stds(build_tiny_in_memory(seed=0)[0]) == pytest.approx([0.02] * 5, rel=0.05)
    assert stds(build_tiny_in_memory(seed=0, init_std=0.1)[0]) == pytest.approx([0.1] * 5, rel=0.05)
    cfg = tiny_qwen3vl_config(build_tiny_tokenizer(), init_std=0.1)
    assert cfg.initializer_range == cfg.text_config.initializer_range == cfg.vision_config.initializer_range == 0.1
    with pytest.raises(ValueError, match="init_std must be > 0"):
        tiny_qwen3vl_config(build_tiny_tokenizer(), init_std=0.0)


def test_coord_init_initialises_the_coord_rows_as_the_loader_does():
    # "hf" (the default) leaves the coord rows random like every other row; "sincos" replaces exactly the
    # coord rows of the input embeddings and of the (untied) LM head with what the loader writes into
    # the rows it adds to a real checkpoint: coord_init_rows of the table's rows below the coord block,
    # seeded by the build seed (head: seed + 1, as init_coord_rows does).
    from model.vocab import coord_init_rows, coord_vocab_from_tokenizer

    hf, tok, _ = build_tiny_in_memory(seed=2)
    sc, _, _ = build_tiny_in_memory(seed=2, coord_init="sincos")
    vocab = coord_vocab_from_tokenizer(tok)
    lo, hi = vocab.first_id, vocab.end_id
    for table, seed in ((lambda m: m.get_input_embeddings().weight, 2), (lambda m: m.lm_head.weight, 3)):
        a, b = table(hf), table(sc)
        assert torch.equal(a[:lo], b[:lo]) and torch.equal(a[hi:], b[hi:])
        expected = coord_init_rows(a[:lo], vocab.num_bins, init="sincos", seed=seed)
        assert torch.equal(b[lo:hi], expected)
        centred = b[lo:hi] - b[lo:hi].mean(0)
        neighbours = torch.nn.functional.cosine_similarity(centred[:-1], centred[1:]).mean()
        far = torch.nn.functional.cosine_similarity(centred[:1], centred[-1:]).item()
        assert neighbours > 0.9 and far < 0.5  # smooth in the bin index, unlike the random rows
        raw = a[lo:hi] - a[lo:hi].mean(0)
        assert abs(torch.nn.functional.cosine_similarity(raw[:-1], raw[1:]).mean()) < 0.1
    others = dict(sc.named_parameters())
    assert all(torch.equal(p, others[k]) for k, p in hf.named_parameters()
               if k not in ("model.language_model.embed_tokens.weight", "lm_head.weight"))
    with pytest.raises(ValueError, match="model.tiny.coord_init must be one of"):
        build_tiny_in_memory(coord_init="smooth")
    with pytest.raises(ValueError, match="needs the coord tokens"):
        build_tiny_in_memory(coord_tokens=False, coord_init="sincos")


def test_config_enums_are_the_builders_choices():
    # configs/ stays torch-free, so its enums restate the model's tuples; the generated schema must agree
    import json
    from pathlib import Path

    from model.loading import ATTN_IMPLEMENTATIONS, DTYPES
    from model.tiny import TINY_COORD_INITS
    from model.vocab import COORD_INITS

    schema = json.loads((Path(__file__).resolve().parents[1] / "configs/schema/model.json").read_text())
    props = schema["properties"]
    assert props["tiny"]["properties"]["coord_init"]["enum"] == list(TINY_COORD_INITS)
    assert props["coord_tokens"]["properties"]["init"]["enum"] == list(COORD_INITS)
    assert props["attn_implementation"]["enum"] == list(ATTN_IMPLEMENTATIONS)
    assert props["dtype"]["enum"] == list(DTYPES)


def test_in_memory_build_is_fast_and_seeded():
    build_tiny_in_memory(seed=0)  # warm the tokenizer cache and imports
    t0 = time.perf_counter()
    m1, tok, proc = build_tiny_in_memory(seed=3)
    assert time.perf_counter() - t0 < 1.0
    m2, _, _ = build_tiny_in_memory(seed=3)
    m3, _, _ = build_tiny_in_memory(seed=4)
    p1, p2, p3 = (dict(m.named_parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert not all(torch.equal(p1[k], p3[k]) for k in p1)
    # the global RNG is not consumed by building
    torch.manual_seed(7)
    x = torch.rand(3)
    torch.manual_seed(7)
    build_tiny_in_memory(seed=1)
    assert torch.equal(torch.rand(3), x)
    # each call gets its own tokenizer: mutating one leaves the next build alone
    tok.add_tokens(["zzzunique"])
    assert "zzzunique" not in build_tiny_in_memory()[1].get_vocab()


def test_image_processor_geometry():
    from PIL import Image

    proc = build_tiny_image_processor()
    out = proc(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64 px / 16 px patches; 4 tokens after 2x2 merge
    assert out["pixel_values"].shape == (16, 3 * 2 * 16 * 16)
