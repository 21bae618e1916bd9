"""HF generation backend on the tiny random Qwen3-VL: batching, log-probs, RNG isolation, eos handling."""

from __future__ import annotations

import os

import pytest
import torch

from data.encoding import ChatEncoder
from data.types import GTObject, Record
from model.tiny import build_tiny_in_memory
from rollout.backends import GenerationBackend, HFGenerationBackend
from tests._data_fixtures import write_png

# Different image sizes -> different image-token counts -> different prompt lengths.
SIZES = [(64, 64), (32, 64), (64, 32), (48, 48), (64, 64), (32, 32), (40, 64), (64, 48)]
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok, proc = build_tiny_in_memory(seed=0)
    enc = ChatEncoder(tok, proc, prompt="Detect all objects.")
    d = tmp_path_factory.mktemp("imgs")
    prompts = []
    for i, (w, h) in enumerate(SIZES):
        path = write_png(os.path.join(d, f"{i}.png"), w, h, color=((37 * i) % 255, 90, 200 - 20 * i))
        rec = Record(path, w, h, (GTObject("cat", (1, 2, 30, 40)),), f"img{i}", f"t.jsonl:{i + 1}")
        prompts.append(enc.encode_prompt(rec))
    assert len({len(p) for p in prompts}) > 1 and len({tuple(p.image_grid_thw.flatten().tolist()) for p in prompts}) > 1
    return model, tok, prompts


def test_batched_equals_one_by_one_greedy(setup):
    model, tok, prompts = setup
    batched = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8).generate(prompts)
    single = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=1).generate(prompts)
    assert isinstance(HFGenerationBackend(model, tok, max_new_tokens=1), GenerationBackend)
    assert len(batched) == len(prompts)
    for a, b in zip(batched, single):
        assert a.token_ids == b.token_ids
        assert len(a.token_logprobs) == len(a.token_ids)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.finished == b.finished
    # prompts really differ: not every output is the same
    assert len({tuple(o.token_ids) for o in batched}) > 1


def test_logprobs_match_teacher_forced_forward(setup):
    model, tok, prompts = setup
    p = prompts[1]
    out = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW).generate([p])[0]
    ids = torch.cat([p.input_ids, torch.tensor(out.token_ids)])[None]
    mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(out.token_ids), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=p.pixel_values,
            image_grid_thw=p.image_grid_thw,
            mm_token_type_ids=mm,
        ).logits[0]
    model.model.rope_deltas = None
    L = len(p)
    lp = torch.log_softmax(logits.float(), dim=-1)
    want = [float(lp[L - 1 + t, tok_id]) for t, tok_id in enumerate(out.token_ids)]
    assert out.token_logprobs == pytest.approx(want, abs=1e-4)
    # greedy: each chosen token is the argmax of the teacher-forced distribution
    assert [int(lp[L - 1 + t].argmax()) for t in range(len(out.token_ids))] == out.token_ids


def test_sampling_leaves_global_rng_and_train_mode_alone(setup):
    model, tok, prompts = setup
    model.train()
    old_rope = model.model.rope_deltas
    cpu_state = torch.get_rng_state()
    try:
        a = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.9, seed=7)
        b = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, top_k=50, top_p=0.9, seed=7)
        out_a = a.generate(prompts[:3])
        assert torch.equal(torch.get_rng_state(), cpu_state)  # the training RNG did not move
        torch.manual_seed(999)  # a different global state must not change the backend's samples
        out_b = b.generate(prompts[:3])
        assert [o.token_ids for o in out_a] == [o.token_ids for o in out_b]
        assert model.training  # train mode restored
        assert model.model.rope_deltas is old_rope
        assert all(lp <= 0.0 for o in out_a for lp in o.token_logprobs)
    finally:
        model.eval()


def test_eos_stops_and_trims(setup):
    model, tok, prompts = setup
    free = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW).generate(prompts[:2])
    stop = free[0].token_ids[2]
    out = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, eos_token_ids=[stop]).generate(prompts[:2])
    first = free[0].token_ids.index(stop)
    assert out[0].token_ids == free[0].token_ids[: first + 1] and out[0].finished
    assert out[0].token_logprobs == pytest.approx(free[0].token_logprobs[: first + 1], abs=1e-4)
    if stop not in free[1].token_ids:
        assert out[1].token_ids == free[1].token_ids and not out[1].finished


def test_bad_settings_fail_fast(setup):
    model, tok, _ = setup
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFGenerationBackend(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        HFGenerationBackend(model, tok, max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        HFGenerationBackend(model, tok, max_new_tokens=4, top_p=0)
