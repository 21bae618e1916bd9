"""Forward helpers on the tiny Qwen3-VL: packed rows are exact, vision runs once, positions are per segment."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from data.packing import collate_rows
from data.types import EncodedSample
from model.forward import (
    HiddenStatesModel,
    compute_vision,
    embed_tokens,
    position_ids_for_batch,
)
from model.tiny import build_tiny_in_memory
from model.vocab import coord_vocab_from_tokenizer

ATOL = 1e-5  # fp32, SDPA: packed vs unpacked differ by ~1e-7


def logits_at(hidden: torch.Tensor, flat_positions: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reference projection for the tests: rows of ``hidden`` [B, T, H] at flat positions times ``weight`` [R, H]."""
    return hidden.reshape(-1, hidden.shape[-1])[flat_positions] @ weight.T


@pytest.fixture(scope="module")
def tiny():
    model, tok, proc = build_tiny_in_memory(seed=0)
    return model, tok, proc


def make_sample(tok, proc, size, colour, answer) -> EncodedSample:
    """Prompt with one image (pads expanded to the image's token count) + answer + <|im_end|>."""
    img = Image.new("RGB", size, colour)
    img.putpixel((3, 5), (0, 0, 0))
    vis = proc(images=[img], return_tensors="pt")
    grid = vis["image_grid_thw"]
    n_img = int(grid.prod()) // proc.merge_size**2
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect all objects."}]}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_img)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor(p_ids + a_ids, dtype=torch.long)
    n = len(ids)
    mm = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    assert int(mm.sum()) == n_img
    return EncodedSample(
        input_ids=ids,
        token_types=torch.full((n,), -1),
        object_index=torch.full((n,), -1),
        subset=torch.full((n,), -1),
        coord_targets=torch.full((n,), -1),
        closure=torch.zeros(n, dtype=torch.bool),
        mm_token_type_ids=mm,
        pixel_values=vis["pixel_values"],
        image_grid_thw=grid,
        prompt_len=len(p_ids),
    )


@pytest.fixture(scope="module")
def samples(tiny):
    _, tok, proc = tiny
    a = make_sample(
        tok,
        proc,
        (64, 64),
        (200, 30, 30),
        '{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_10|>, <|coord_20|>, <|coord_300|>, <|coord_400|>]}]}',
    )
    b = make_sample(tok, proc, (96, 48), (30, 30, 200), '{"objects": []}')
    assert a.image_grid_thw.tolist() != b.image_grid_thw.tolist()  # different image sizes
    return a, b


def run(model, batch, **kw):
    hs = HiddenStatesModel(model)
    pos = position_ids_for_batch(model, batch)
    with torch.no_grad():
        return hs(
            input_ids=batch.input_ids,
            position_ids=pos,
            mm_token_type_ids=batch.mm_token_type_ids,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            **kw,
        )


def test_packed_row_equals_unpacked_samples(tiny, samples):
    model, tok, _ = tiny
    a, b = samples
    pad = tok.pad_token_id
    packed = collate_rows([[a, b], [b]], pad_token_id=pad)  # row 1 is right-padded
    h_packed = run(model, packed)
    h_a = run(model, collate_rows([[a]], pad))[0]
    h_b = run(model, collate_rows([[b]], pad))[0]
    la, lb = len(a), len(b)
    torch.testing.assert_close(h_packed[0, :la], h_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_packed[0, la : la + lb], h_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(h_packed[1, :lb], h_b, atol=ATOL, rtol=0)
    # logits too (projected only at the positions we ask for)
    W = HiddenStatesModel(model).lm_head_weight
    T = packed.shape[1]
    flat = torch.arange(la, la + lb) + 0 * T
    torch.testing.assert_close(logits_at(h_packed, flat, W), h_b @ W.T, atol=ATOL, rtol=0)
    # and against the library's own unpacked forward (its own position ids, full logits)
    with torch.no_grad():
        ref = model(
            input_ids=a.input_ids[None],
            mm_token_type_ids=a.mm_token_type_ids[None],
            pixel_values=a.pixel_values,
            image_grid_thw=a.image_grid_thw,
            use_cache=False,
        ).logits[0]
    torch.testing.assert_close(logits_at(h_packed, torch.arange(la), W), ref, atol=ATOL, rtol=0)


def test_three_row_positions_would_leak_between_segments(tiny, samples):
    """Guard the premise: without row 0 the second segment sees the first (so the 4th row matters)."""
    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b]], tok.pad_token_id)
    pos = position_ids_for_batch(model, packed)
    with torch.no_grad():
        leak = model.model(
            input_ids=packed.input_ids,
            position_ids=pos[1:],
            mm_token_type_ids=packed.mm_token_type_ids,
            pixel_values=packed.pixel_values,
            image_grid_thw=packed.image_grid_thw,
            use_cache=False,
        ).last_hidden_state
    h_b = run(model, collate_rows([[b]], tok.pad_token_id))[0]
    assert (leak[0, len(a) :] - h_b).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[4, B, T\]"):
        HiddenStatesModel(model)(
            input_ids=packed.input_ids, position_ids=pos[1:], mm_token_type_ids=packed.mm_token_type_ids
        )


def test_position_ids_by_hand(tiny, samples):
    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b]], tok.pad_token_id)
    pos = position_ids_for_batch(model, packed)
    assert pos.shape == (4, 1, len(a) + len(b))
    assert torch.equal(pos[0, 0], torch.cat([torch.arange(len(a)), torch.arange(len(b))]))
    # Segment b alone, by hand: text before the image counts 0..s-1; the image (grid t=1, 48x96 px ->
    # 3x6 patches of 16 -> merged h=?; read from grid) takes t=s, h=s+i, w=s+j; text after resumes at
    # s + max(h, w).
    t, gh, gw = b.image_grid_thw[0].tolist()
    mh, mw = gh // 2, gw // 2
    img = torch.nonzero(b.mm_token_type_ids).flatten()
    s = int(img[0])
    seg = pos[1:, 0, len(a) :]
    assert torch.equal(seg[:, :s], torch.arange(s).expand(3, s))
    i = torch.arange(mh).repeat_interleave(mw)
    j = torch.arange(mw).repeat(mh)
    assert torch.equal(seg[0, img], torch.full((mh * mw,), s))
    assert torch.equal(seg[1, img], s + i)
    assert torch.equal(seg[2, img], s + j)
    after = int(img[-1]) + 1
    rest = len(b) - after
    assert torch.equal(seg[:, after:], (s + max(mh, mw) + torch.arange(rest)).expand(3, rest))


def test_image_grid_rows_must_match_segments(tiny, samples):
    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b]], tok.pad_token_id)
    packed.image_grid_thw = packed.image_grid_thw[:1]
    with pytest.raises(ValueError, match="image_grid_thw"):
        position_ids_for_batch(model, packed)


def test_vision_once_reused_matches_plain_path(tiny, samples):
    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b]], tok.pad_token_id)
    plain = run(model, packed)
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        hs = HiddenStatesModel(model)
        pos = position_ids_for_batch(model, packed)
        with torch.no_grad():
            enc = compute_vision(model, packed.pixel_values, packed.image_grid_thw)
            outs = [
                hs(
                    input_ids=packed.input_ids,
                    position_ids=pos,
                    mm_token_type_ids=packed.mm_token_type_ids,
                    image_grid_thw=packed.image_grid_thw,
                    vision=enc,
                )
                for _ in range(2)
            ]
            # the Channel-A path: inputs_embeds (image pads keep their pad embedding) + reused vision
            emb = embed_tokens(model, packed.input_ids)
            outs.append(
                hs(
                    inputs_embeds=emb,
                    position_ids=pos,
                    mm_token_type_ids=packed.mm_token_type_ids,
                    image_grid_thw=packed.image_grid_thw,
                    vision=enc,
                )
            )
    finally:
        handle.remove()
    assert len(calls) == 1
    for out in outs:
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


def test_gradients_flow_through_reused_vision_and_coord_rows(tiny, samples):
    model, tok, _ = tiny
    a, _ = samples
    vocab = coord_vocab_from_tokenizer(tok)
    batch = collate_rows([[a]], tok.pad_token_id)
    model.zero_grad()
    hs = HiddenStatesModel(model)
    pos = position_ids_for_batch(model, batch)
    enc = compute_vision(model, batch.pixel_values, batch.image_grid_thw)
    emb = embed_tokens(model, batch.input_ids)
    E = model.get_input_embeddings().weight[vocab.first_id : vocab.end_id]  # the coord rows, a view
    assert E.shape == (1000, model.config.text_config.hidden_size)
    assert E.data_ptr() == model.get_input_embeddings().weight[vocab.first_id].data_ptr()  # a view, not a copy
    coord_pos = torch.nonzero(vocab.is_coord(batch.input_ids[0])).flatten()
    emb = emb.clone()
    emb[0, coord_pos] = E[:4]  # soft coord slots, as in self_context
    h = hs(
        inputs_embeds=emb,
        position_ids=pos,
        mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        vision=enc,
    )
    logits = logits_at(h, coord_pos - 1, model.get_output_embeddings().weight[vocab.first_id : vocab.end_id])
    assert logits.shape == (4, 1000)
    logits.sum().backward()
    emb_grad = model.get_input_embeddings().weight.grad
    assert emb_grad[vocab.first_id : vocab.first_id + 4].abs().sum() > 0
    assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad[vocab.first_id : vocab.end_id].abs().sum() > 0
    model.zero_grad()


def test_forward_argument_errors(tiny, samples):
    model, tok, _ = tiny
    a, _ = samples
    batch = collate_rows([[a]], tok.pad_token_id)
    pos = position_ids_for_batch(model, batch)
    hs = HiddenStatesModel(model)
    with pytest.raises(ValueError, match="exactly one"):
        hs(position_ids=pos, mm_token_type_ids=batch.mm_token_type_ids)
    with torch.no_grad():
        enc = compute_vision(model, batch.pixel_values, batch.image_grid_thw)
    with pytest.raises(ValueError, match="not both"):
        hs(
            input_ids=batch.input_ids,
            position_ids=pos,
            mm_token_type_ids=batch.mm_token_type_ids,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            vision=enc,
        )


def test_text_only_rows_pack_exactly(tiny):
    """No images at all (e.g. a rollout prefix test): empty pixel tensors are accepted, packing stays exact."""
    model, tok, _ = tiny

    def text_sample(text):
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        n = len(ids)
        neg = torch.full((n,), -1)
        return EncodedSample(
            ids,
            neg,
            neg,
            neg,
            neg,
            torch.zeros(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(0),
            torch.zeros(0, 3, dtype=torch.long),
            prompt_len=0,
        )

    a, b = text_sample('{"objects": [{"desc": "cat"'), text_sample("red square <|coord_5|>")
    packed = collate_rows([[a, b]], tok.pad_token_id)
    assert packed.pixel_values.numel() == 0
    h = run(model, packed)
    h_b = run(model, collate_rows([[b]], tok.pad_token_id))[0]
    torch.testing.assert_close(h[0, len(a) :], h_b, atol=ATOL, rtol=0)
    pos = position_ids_for_batch(model, packed)
    assert torch.equal(pos[1:, 0, len(a) :], torch.arange(len(b)).expand(3, len(b)))


def test_hidden_states_one_call_matches_explicit_path(tiny, samples):
    from model.forward import hidden_states

    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b]], tok.pad_token_id)
    ref = run(model, packed)
    hs = HiddenStatesModel(model)
    with torch.no_grad():
        enc = compute_vision(model, packed.pixel_values, packed.image_grid_thw)
        torch.testing.assert_close(hidden_states(hs, packed), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(hidden_states(model, packed, vision=enc), ref, atol=1e-6, rtol=0)
        emb = embed_tokens(model, packed.input_ids)
        torch.testing.assert_close(hidden_states(hs, packed, inputs_embeds=emb, vision=enc), ref, atol=1e-6, rtol=0)


def test_sdpa_packed_equals_sdpa_on_packed_rows_with_gradients(tiny, samples, monkeypatch):
    """model.attn_implementation sdpa_packed (attention per packed sample) gives sdpa's hidden states and
    gradients on packed, right-padded rows, and its decoder layers really take the per-sample path."""
    import copy

    from model import packed_attention

    model, tok, _ = tiny
    a, b = samples
    packed = collate_rows([[a, b, a], [b, a]], pad_token_id=tok.pad_token_id)
    packed_attention.register()
    models = {"sdpa": copy.deepcopy(model), packed_attention.NAME: copy.deepcopy(model)}
    models[packed_attention.NAME].set_attn_implementation(packed_attention.NAME)
    per_sample = []
    real = packed_attention.F.scaled_dot_product_attention
    hidden, grads = {}, {}
    for name, m in models.items():
        if name == packed_attention.NAME:  # count its unmasked causal calls (the vision tower's are not causal)
            monkeypatch.setattr(packed_attention.F, "scaled_dot_product_attention", lambda *x, **kw: per_sample.append(
                kw.get("is_causal") and kw.get("attn_mask") is None) or real(*x, **kw))
        hs = HiddenStatesModel(m)
        out = hs(input_ids=packed.input_ids, position_ids=position_ids_for_batch(m, packed),
                 mm_token_type_ids=packed.mm_token_type_ids, pixel_values=packed.pixel_values,
                 image_grid_thw=packed.image_grid_thw)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        hidden[name] = out.detach()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    layers = model.config.text_config.num_hidden_layers
    n_buckets = len(packed_attention.packed_segments(position_ids_for_batch(model, packed)[0]).buckets)
    assert sum(per_sample) == layers * n_buckets  # every decoder layer per sample, causal, no mask
    torch.testing.assert_close(hidden[packed_attention.NAME], hidden["sdpa"], atol=ATOL, rtol=0)
    assert grads["sdpa"].keys() == grads[packed_attention.NAME].keys()
    for n, g in grads["sdpa"].items():
        torch.testing.assert_close(grads[packed_attention.NAME][n], g, atol=1e-4, rtol=1e-4, msg=n)
