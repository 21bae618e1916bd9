"""Tiny checkpoint round trip, generation with an image, freezing, saving, and scripts/add_coord_tokens.py."""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
from PIL import Image

from configs.errors import UserError
from model.loading import apply_freeze, load_model_and_processors, save_checkpoint_model
from model.tiny import build_tiny_checkpoint
from model.vocab import CoordVocab


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), seed=0)


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "bare"), seed=0, coord_tokens=False)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_checkpoint_is_idempotent(ckpt):
    stamp = {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
    assert build_tiny_checkpoint(ckpt, seed=0) == ckpt
    assert {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)} == stamp


def test_checkpoint_rebuilds_when_arguments_change(tmp_path):
    import json

    out = str(tmp_path / "t")
    build_tiny_checkpoint(out, seed=0)
    build_tiny_checkpoint(out, seed=0, hidden=48, layers=1, max_pixels=128 * 128)
    loaded = load_model_and_processors(out)
    assert loaded.model.config.text_config.hidden_size == 48
    assert loaded.model.config.text_config.num_hidden_layers == 1
    assert loaded.image_processor.size["longest_edge"] == 128 * 128
    with open(os.path.join(out, "tiny_params.json")) as fh:
        saved = json.load(fh)
    assert {k: saved[k] for k in ("seed", "coord_tokens", "hidden", "layers", "max_pixels")} == {
        "seed": 0, "coord_tokens": True, "hidden": 48, "layers": 1, "max_pixels": 16384}
    assert saved["vision_hidden"] == 32  # defaults are recorded too


def test_explicit_defaults_do_not_rebuild(ckpt):
    """A config that spells out the defaults (every recipe passes model.tiny.*) reuses a checkpoint built
    without them (the test fixtures): otherwise every rank of every launch would rebuild it concurrently."""
    stamp = {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
    same = build_tiny_checkpoint(ckpt, seed=0, hidden=64, layers=2, vision_hidden=32, vision_depth=2,
                                 intermediate=128, max_pixels=4096, init_std=0.02, coord_init="hf")
    assert same == ckpt
    assert {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)} == stamp
    with pytest.raises(TypeError, match="unknown arguments \\['hiden'\\]"):
        build_tiny_checkpoint(ckpt, hiden=64)


def test_tiny_build_ignores_a_zero3_launch(tmp_path, monkeypatch):
    """Inside a DeepSpeed ZeRO-3 launch transformers would build the model under zero.Init (partitioned,
    differently initialised, saved as empty tensors); the builder hides accelerate's config for the
    build and restores it after."""
    from transformers.integrations import deepspeed as hf_ds

    import model.tiny as tiny_mod

    class FakeZero3Config:
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    fake = FakeZero3Config()
    hf_ds.set_hf_deepspeed_config(fake)
    seen = []
    real = tiny_mod.build_tiny_in_memory

    @functools.wraps(real)  # keeps the signature the builder reads its defaults from
    def spy(**kw):
        seen.append(hf_ds.is_deepspeed_zero3_enabled())
        return real(**kw)

    monkeypatch.setattr(tiny_mod, "build_tiny_in_memory", spy)
    try:
        out = build_tiny_checkpoint(str(tmp_path / "z3"), seed=0)
        assert seen == [False]
        assert hf_ds.is_deepspeed_zero3_enabled()  # restored for the real model load
    finally:
        hf_ds.unset_hf_deepspeed_config()
    plain = build_tiny_checkpoint(str(tmp_path / "plain"), seed=0)
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(plain, "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_and_generate_with_image(ckpt):
    loaded = load_model_and_processors(ckpt)
    model, tok, proc, vocab = loaded  # unpacks like a tuple
    assert not loaded.added_coord_tokens
    assert vocab == CoordVocab(first_id=tok.convert_tokens_to_ids("<|coord_0|>"))
    assert model.get_input_embeddings().weight.shape[0] > len(tok)  # more rows than entries, kept
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id

    img = Image.new("RGB", (64, 64), (10, 200, 10))
    vis = proc(images=[img], return_tensors="pt")
    n_img = int(vis["image_grid_thw"].prod()) // proc.merge_size**2
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect."}]}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_img)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    mm = (enc["input_ids"] == model.config.image_token_id).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            mm_token_type_ids=mm,
            pixel_values=vis["pixel_values"],
            image_grid_thw=vis["image_grid_thw"],
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
        )
    L = enc["input_ids"].shape[1]
    assert out.shape == (1, L + 6)
    assert torch.equal(out[0, :L], enc["input_ids"][0])
    new = out[0, L:]
    assert ((new >= 0) & (new < model.config.text_config.vocab_size)).all()
    # greedy's first token is the argmax of our own hidden-states path at the last prompt position
    from data.types import PackedBatch, Segment
    from model.forward import HiddenStatesModel, position_ids_for_batch

    batch = PackedBatch(
        input_ids=enc["input_ids"],
        token_types=None,
        object_index=None,
        subset=None,
        coord_targets=None,
        closure=None,
        dropped_invalid=None,
        mm_token_type_ids=mm,
        segment_ids=torch.zeros_like(mm),
        text_position_ids=torch.arange(L)[None],
        pixel_values=vis["pixel_values"],
        image_grid_thw=vis["image_grid_thw"],
        segments=[Segment(0, 0, L, 0)],
        bbox_groups=[],
    )
    hs = HiddenStatesModel(model)
    with torch.no_grad():
        h = hs(
            input_ids=batch.input_ids,
            position_ids=position_ids_for_batch(model, batch),
            mm_token_type_ids=mm,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        )
    assert int((h[0, L - 1] @ hs.lm_head_weight.T).argmax()) == int(new[0])


def test_load_options_fail_fast(ckpt, bare_ckpt, monkeypatch):
    with pytest.raises(ValueError, match="model.dtype"):
        load_model_and_processors(ckpt, dtype="fp8")
    with pytest.raises(ValueError, match="model.attn_implementation"):
        load_model_and_processors(ckpt, attn_implementation="flash")
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        load_model_and_processors(ckpt, attn_implementation="flash_attention_2")
    # before the weights load: one line naming the Stage-1 output and scripts/add_coord_tokens.py
    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the coord-token check"))
    with pytest.raises(UserError, match=r"has no coord tokens .*checkpoint-<step>/model.*scripts/add_coord_tokens\.py"):
        load_model_and_processors(bare_ckpt, add_coord_tokens=False)


def test_bf16_load(ckpt):
    model = load_model_and_processors(ckpt, dtype="bfloat16").model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_apply_freeze_counts(ckpt):
    model = load_model_and_processors(ckpt).model
    visual = model.model.visual
    n_merger = sum(p.numel() for p in visual.merger.parameters()) + sum(
        p.numel() for p in visual.deepstack_merger_list.parameters()
    )
    n_visual = sum(p.numel() for p in visual.parameters())
    n_total = sum(p.numel() for p in model.parameters())
    counts = apply_freeze(model, vision=True, merger=False, language_model=True)
    assert counts == {"trainable": n_merger, "frozen": n_total - n_merger, "total": n_total}
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert not visual.patch_embed.proj.weight.requires_grad and not model.lm_head.weight.requires_grad
    counts = apply_freeze(model, vision=False, merger=True, language_model=False)
    assert counts["frozen"] == n_merger and counts["trainable"] == n_total - n_merger
    counts = apply_freeze(model, vision=True, merger=True, language_model=False)
    assert counts["trainable"] == n_total - n_visual
    assert apply_freeze(model, False, False, False)["frozen"] == 0


def test_save_checkpoint_model_round_trip(ckpt, tmp_path):
    model, tok, proc, vocab = load_model_and_processors(ckpt)
    with torch.no_grad():
        model.lm_head.weight[vocab.first_id] += 1.0  # a change that must survive the save
    before = _params(model)
    out = save_checkpoint_model(model, tok, proc, str(tmp_path / "saved"))
    again = load_model_and_processors(out)
    after = _params(again.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert again.coord_vocab == vocab and len(again.tokenizer) == len(tok)


def test_add_coord_tokens_script(bare_ckpt, tmp_path, capsys):
    from scripts.add_coord_tokens import main

    src = load_model_and_processors(bare_ckpt, add_coord_tokens=True)  # in memory only; bare_ckpt untouched
    assert src.added_coord_tokens
    out = str(tmp_path / "with_coords")
    assert main([bare_ckpt, "--out", out]) == 0
    assert "coord tokens added" in capsys.readouterr().out
    loaded = load_model_and_processors(out, add_coord_tokens=False)  # must already have them
    tok, model, vocab = loaded.tokenizer, loaded.model, loaded.coord_vocab
    assert vocab.first_id == len(tok) - 1000 and tok.convert_tokens_to_ids("<|im_end|>") < vocab.first_id
    assert model.get_input_embeddings().weight.shape[0] >= vocab.end_id
    assert all(len(tok(f"<|coord_{k}|>", add_special_tokens=False)["input_ids"]) == 1 for k in (0, 1, 500, 999))
    # the original checkpoint's vocabulary rows are kept, and the script output equals the in-memory add
    from transformers import AutoModelForImageTextToText

    orig = AutoModelForImageTextToText.from_pretrained(bare_ckpt)
    emb0 = orig.get_input_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[: vocab.first_id], emb0[: vocab.first_id])
    torch.testing.assert_close(
        emb[vocab.first_id : vocab.end_id], src.model.get_input_embeddings().weight[vocab.first_id : vocab.end_id]
    )
    # running it again on its own output reports the tokens as present
    assert main([out, "--out", str(tmp_path / "again")]) == 0
    assert "already present" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([out, "--out", out])


def test_param_parts_match_freeze(ckpt):
    from model.loading import PARTS, param_parts

    model = load_model_and_processors(ckpt).model
    parts = param_parts(model)
    visual = model.model.visual
    assert parts[id(visual.merger.linear_fc1.weight)] == "merger"
    assert parts[id(visual.patch_embed.proj.weight)] == "vision"
    assert parts[id(model.lm_head.weight)] == "language_model"
    assert set(parts.values()) == set(PARTS)
    for part in PARTS:  # freezing one part leaves exactly the parameters param_parts puts elsewhere
        apply_freeze(model, **{p: p == part for p in PARTS})
        assert all(p.requires_grad == (parts[id(p)] != part) for p in model.parameters())
def test_attn_auto_picks_flash_only_when_usable(monkeypatch, caplog):
    import logging
    import types

    from model import loading

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    console = logging.getLogger("coordexp")  # may not propagate (training.setup.setup_logging): listen on it
    console.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="coordexp"):
            assert loading.resolve_attn("auto") == "sdpa_packed"
    finally:
        console.removeHandler(caplog.handler)
    assert "model.attn_implementation=auto -> sdpa_packed" in caplog.text
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    assert loading.resolve_attn("auto") == "flash_attention_2"
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    assert loading.resolve_attn("auto") == "sdpa_packed"  # flash-attn without CUDA cannot run
    assert loading.resolve_attn("eager") == "eager"


def test_missing_local_checkpoint_fails_before_loading_naming_the_key(tmp_path):
    from configs.errors import UserError

    with pytest.raises(UserError, match=r"^model.name_or_path='.*nope': no such directory"):
        load_model_and_processors(str(tmp_path / "nope"), key="model.name_or_path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_and_processors(str(tmp_path / "empty"))


def test_relative_paths_under_a_local_folder_are_local(tmp_path, monkeypatch):
    from model.loading import looks_local

    monkeypatch.chdir(tmp_path)
    assert not looks_local("Qwen/Qwen3-VL-2B-Instruct")  # a hub id
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/tiny_qwen3vl") and looks_local("./x") and looks_local("a/b/c")
