"""Adapters (model/adapters.py): LoRA through peft and the coord-offset adapter.

Unit tests on the in-memory tiny model (tied and untied LM head), then recipe runs on the shared
tiny checkpoint: only adapter tensors change, resume is exact, the merged model gives the same
logits as the adapted one, and Stage-2 Two-Channel (both channels) trains under LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_stage1
import train_stage2
from model.adapters import (
    AdapterSpec,
    adapter_state_dict,
    apply_adapter,
    load_adapter_weights,
    merge_adapter,
    save_adapter,
)
from model.tiny import build_tiny_in_memory
from model.vocab import coord_vocab_from_tokenizer
from tests._recipe_helpers import (
    STAGE1_DEMO,
    STAGE2_DEMO,
    SimulatedCrash,
    crash_on_pipeline_call,
    read_rows,
    recipe_argv,
)


def _tiny(tied: bool):
    model, tok, _ = build_tiny_in_memory(seed=0, tie_word_embeddings=tied)
    return model, coord_vocab_from_tokenizer(tok)


def _ids(vocab):
    return torch.tensor([[1, 2, 3, vocab.first_id + 5, vocab.first_id + 999, 4, vocab.first_id]])


def _train(model, ids, steps: int = 3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def _base_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("spec", [
    AdapterSpec(type="lora", r=4, dropout=0.0),
    AdapterSpec(type="lora", r=4, dropout=0.0, vision=True, merger=True, coord_offset=False),
    AdapterSpec(type="coord_offset"),
], ids=["lora+offset", "lora-all-towers", "coord_offset"])
def test_adapter_starts_at_base_trains_only_itself_and_merges_exactly(tied, spec):
    model, vocab = _tiny(tied)
    ids = _ids(vocab)
    base_logits = model(input_ids=ids).logits
    base = _base_tensors(model)
    counts = apply_adapter(model, spec, vocab)
    assert 0 < counts["trainable"] < counts["total"]
    assert counts["trainable"] == counts["lora"] + counts["coord_offset"]
    assert (counts["coord_offset"] > 0) == spec.uses_coord_offset
    assert (counts["lora"] > 0) == (spec.type == "lora")
    # B = 0 and offsets = 0: the adapted model is the base model before the first step
    torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)

    _train(model, ids)
    adapted = model(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    # every base tensor is bit-identical (a parametrized table's base lives in .original)
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        key = name.replace(".parametrizations.weight.original", ".weight").replace(".base_layer.", ".")
        assert torch.equal(param, base[key]), name

    merge_adapter(model)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert not any("lora_" in n or "parametrizations" in n for n, _ in model.named_parameters())


def test_lora_targets_only_the_towers_asked_for():
    model, vocab = _tiny(False)
    apply_adapter(model, AdapterSpec(type="lora", r=2, coord_offset=False), vocab)
    lora = [n for n, _ in model.named_parameters() if ".lora_A." in n]
    assert lora and all(n.startswith("model.language_model.") for n in lora)
    model, vocab = _tiny(False)
    apply_adapter(model, AdapterSpec(type="lora", r=2, vision=True, merger=True), vocab)
    lora = {n.split(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(".visual.blocks." in n for n in lora)
    assert any(".visual.merger." in n for n in lora) and any(".deepstack_merger_list." in n for n in lora)


def test_lora_with_no_matching_module_fails_with_the_key():
    model, vocab = _tiny(False)
    with pytest.raises(ValueError, match="target_modules"):
        apply_adapter(model, AdapterSpec(type="lora", target_modules=("nope",), coord_offset=False), vocab)


@pytest.mark.parametrize("tied", [False, True])
def test_coord_offset_changes_only_the_coord_rows(tied):
    """The effective input table and LM head differ from the base only in the 1000 coord rows."""
    model, vocab = _tiny(tied)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    apply_adapter(model, AdapterSpec(type="coord_offset"), vocab)
    _train(model, _ids(vocab))
    coord = torch.zeros(emb0.shape[0], dtype=torch.bool)
    coord[vocab.first_id : vocab.end_id] = True
    for now, before in ((model.get_input_embeddings().weight, emb0), (model.get_output_embeddings().weight, head0)):
        changed = (now.detach() != before).any(dim=1)
        assert changed[coord].any()
        assert not changed[~coord].any()
    # Channel-A's context embeddings read the coord rows through the embedding module: they see the offsets
    table = model.get_input_embeddings()(vocab.ids)
    assert not torch.equal(table, emb0[vocab.first_id : vocab.end_id])


def test_save_and_load_adapter_roundtrip(tmp_path):
    model, vocab = _tiny(False)
    spec = AdapterSpec(type="lora", r=4, dropout=0.0)
    apply_adapter(model, spec, vocab)
    _train(model, _ids(vocab), steps=2)
    save_adapter(model, tmp_path, spec, base="some/base")
    other, _ = _tiny(False)
    apply_adapter(other, spec, vocab, seed=123)  # a different init: loading must overwrite all of it
    load_adapter_weights(other, tmp_path)
    for (n, a), (_, b) in zip(sorted(adapter_state_dict(model).items()), sorted(adapter_state_dict(other).items())):
        assert torch.equal(a, b), n
    meta = json.loads((tmp_path / "adapter.json").read_text())
    assert meta["base"] == "some/base" and meta["adapter"]["type"] == "lora"
    # another adapter shape is refused with the file named
    third, _ = _tiny(False)
    apply_adapter(third, AdapterSpec(type="coord_offset"), vocab)
    with pytest.raises(ValueError, match="adapter.safetensors"):
        load_adapter_weights(third, tmp_path)


# ---------------------------------------------------------------- recipes



def _lora_argv(env, out, name, max_steps, **sets):
    return recipe_argv(env, STAGE1_DEMO, out, name=name, max_steps=max_steps, model__adapter__type="lora",
                       model__adapter__lora__r=4, training__warmup_steps=1, training__eval_every=0, **sets)


@pytest.fixture(scope="module")
def lora_stage1(recipe_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_stage1")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out)
        train_stage1.main(_lora_argv(recipe_env, out, "lora", 4, training__save_every=2))
    return out / "lora"


def test_lora_stage1_checkpoint_holds_only_the_adapter_and_base_is_untouched(lora_stage1, recipe_env):
    model_dir = lora_stage1 / "checkpoint-4" / "model"
    assert (model_dir / "adapter.safetensors").is_file() and (model_dir / "adapter.json").is_file()
    assert not (model_dir / "model.safetensors").exists()
    saved = load_file(str(model_dir / "adapter.safetensors"))
    assert saved and all(".lora_" in k or k.endswith(".offset") for k in saved)
    assert any(k.endswith(".offset") for k in saved)  # coord rows train alongside LoRA by default
    assert all(v.abs().max() > 0 for k, v in saved.items() if ".lora_B." in k or k.endswith(".offset"))
    meta = json.loads((model_dir / "adapter.json").read_text())
    assert Path(meta["base"]).resolve() == Path(recipe_env.tiny_dir).resolve()
    assert json.loads((model_dir / "coordexp_settings.json").read_text())["settings"]["data.prompt"]


def test_merged_adapter_checkpoint_gives_the_adapted_logits(lora_stage1, tmp_path):
    """scripts/merge_adapter.py writes a plain model; its logits equal base + adapter unmerged."""
    from model.adapters import read_adapter_config
    from model.loading import load_model_and_processors
    from scripts import merge_adapter

    model_dir = lora_stage1 / "checkpoint-4" / "model"
    meta = read_adapter_config(model_dir)
    unmerged = load_model_and_processors(meta.base)
    apply_adapter(unmerged.model, meta.spec, unmerged.coord_vocab)
    load_adapter_weights(unmerged.model, model_dir)
    unmerged.model.eval()
    assert merge_adapter_main(merge_adapter, model_dir, tmp_path / "merged") == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    settings = "coordexp_settings.json"  # the run's inference settings travel with the merged model
    assert (tmp_path / "merged" / settings).read_bytes() == (model_dir / settings).read_bytes()
    merged = load_model_and_processors(str(tmp_path / "merged"), add_coord_tokens=False)  # what eval/infer.py does
    ids = _ids(merged.coord_vocab)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, unmerged.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def merge_adapter_main(module, src: Path, out: Path) -> int:
    return module.main([str(src), "--out", str(out)])


def test_lora_stage1_resume_is_exact(recipe_env, tmp_path, monkeypatch):
    """5 uninterrupted LoRA steps vs. the same run killed in step 4 and resumed from checkpoint-3."""
    monkeypatch.chdir(tmp_path)

    def argv(name, **sets):
        return _lora_argv(recipe_env, tmp_path, name, 5, training__save_every=3, model__adapter__lora__dropout=0.1,
                          **sets)

    train_stage1.main(argv("full"))
    with monkeypatch.context() as mp:
        crash_on_pipeline_call(mp, 4)
        with pytest.raises(SimulatedCrash):
            train_stage1.main(argv("resumed"))
    train_stage1.main(argv("resumed", training__resume_from="latest"))
    full, resumed = read_rows(tmp_path / "full"), read_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(full, resumed):
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5), a["step"]
    fa = load_file(str(tmp_path / "full" / "checkpoint-5" / "model" / "adapter.safetensors"))
    fb = load_file(str(tmp_path / "resumed" / "checkpoint-5" / "model" / "adapter.safetensors"))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6)


def test_coord_offset_stage1_trains_only_the_offsets(recipe_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE1_DEMO, tmp_path, name="off", max_steps=2, model__adapter__type="coord_offset",
                       training__warmup_steps=1, training__eval_every=0, training__save_every=2)
    train_stage1.main(argv)
    saved = load_file(str(tmp_path / "off" / "checkpoint-2" / "model" / "adapter.safetensors"))
    assert saved and all(k.endswith(".offset") for k in saved)
    assert all(v.shape[0] == 1000 and v.abs().max() > 0 for v in saved.values())


def test_lora_stage2_two_channel_trains_both_channels(recipe_env, tmp_path, monkeypatch):
    """b_ratio 0.5: a Channel-A (soft/ST context embeddings read the offset coord rows) and a Channel-B
    (rollouts through the adapted model) step, finite losses, the adapter written at the end."""
    monkeypatch.chdir(tmp_path)
    argv = recipe_argv(recipe_env, STAGE2_DEMO, tmp_path, name="s2", max_steps=2, stage2_ab__schedule__b_ratio=0.5,
                       model__adapter__type="lora", model__adapter__lora__r=4, training__warmup_steps=1,
                       training__eval_every=2, training__save_every=2)
    train_stage2.main(argv)
    rows = read_rows(tmp_path / "s2")
    assert [r["stage2/channel_b_count"] for r in rows] == [0.0, 1.0]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert "eval/rollout/parse_valid_rate" in rows[-1]
    assert (tmp_path / "s2" / "checkpoint-2" / "model" / "adapter.safetensors").is_file()


def test_adapter_tensors_are_fp32_masters_over_a_bf16_base():
    """A frozen bf16 base needs no fp32 copy; the adapter tensors (the only ones that train) stay fp32 so
    small updates land, and the bf16 forward works with them."""
    model, vocab = _tiny(False)
    model.to(torch.bfloat16)
    apply_adapter(model, AdapterSpec(type="lora", r=4, dropout=0.0), vocab)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    before = model(input_ids=_ids(vocab)).logits
    _train(model, _ids(vocab), steps=2)
    after = model(input_ids=_ids(vocab)).logits
    assert torch.isfinite(after).all() and (after.float() - before.float()).abs().max() > 0
