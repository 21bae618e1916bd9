"""HF generation backend on the tiny random Qwen3-VL: batching, log-probs, RNG isolation, eos handling,
static vs dynamic KV cache, length-sorted batches, the auto batch size, the backend factory."""

from __future__ import annotations

import os

import pytest
import torch

from data.encoding import ChatEncoder
from data.types import GTObject, Record
from model.tiny import build_tiny_in_memory
from rollout.backends import (
    AUTO_BATCH_NO_CUDA,
    CoordExpectationPick,
    GenerationBackend,
    HFGenerationBackend,
    estimate_batch_size,
    kv_bytes_per_token,
    length_sorted_batches,
    make_generation_backend,
    trim_at_eos,
)
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


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_batched_equals_one_by_one_greedy(setup, cache):
    model, tok, prompts = setup
    batched = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, cache=cache).generate(prompts)
    single = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=1, cache=cache).generate(prompts)
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


def test_coord_expectation_pick_by_hand():
    """Vocab of 7: text ids 0, 1, 6; coord ids 2..5 are bins 0..3."""
    pick = CoordExpectationPick([2, 3, 4, 5])
    log = torch.log
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])  # E = 0.2 + 0.6 + 1.2 = 2.0 -> bin 2 (id 4)
    p2 = torch.tensor([0.4, 0.2, 0.2, 0.2])  # E = 0.2 + 0.4 + 0.6 = 1.2 -> bin 1 (id 3)
    raw = torch.zeros(3, 7)
    # row 0: coord block of total mass 2 (logits log(2 p)), three text logits 0 (mass 1 each): every
    # single coord token (best 0.8) loses to a text token, the block (2) beats every one of them
    raw[0, 2:6] = log(2 * p1)
    raw[1, 2:6] = log(2 * p2)
    raw[1, 6] = 5.0  # row 1: one text token (e^5) beats the whole coord block (2)
    raw[2, 2:6] = log(p1) + 3.0  # row 2: text logits 0 too, block mass e^3
    out = pick(torch.zeros(3, 1, dtype=torch.long), raw.clone())
    assert int(raw[0].argmax()) in (0, 1, 6)  # argmax decoding would write text here
    assert int(out[0].argmax()) == 4 and float(out[0, 4]) == pytest.approx(float(log(torch.tensor(2.0))), abs=1e-6)
    assert int(out[1].argmax()) == 6  # the text token still wins
    assert float(out[1, 3]) == pytest.approx(float(log(torch.tensor(2.0))), abs=1e-6)  # bin 1 carries the block
    assert int(out[2].argmax()) == 4 and float(out[2, 4]) == pytest.approx(3.0, abs=1e-6)
    for row in range(3):
        others = [i for i in (2, 3, 4, 5) if i != int(out[row, 2:6].argmax()) + 2]
        assert torch.isinf(out[row, others]).all() and (out[row, others] < 0).all()
        assert torch.equal(out[row, [0, 1, 6]], raw[row, [0, 1, 6]])  # text logits untouched
        # the full-softmax probability of the kept coord token is the raw block's mass
        kept = int(out[row, 2:6].argmax()) + 2
        assert float(torch.softmax(out[row], -1)[kept]) == pytest.approx(float(torch.softmax(raw[row], -1)[2:6].sum()), abs=1e-6)


def test_coord_pick_expectation_generation_follows_the_teacher_forced_rule(setup):
    """Every generated token obeys the rule on the teacher-forced logits: a coord token iff the coord
    block's mass beats the best text token, and then the bin nearest the block's expectation."""
    from model.vocab import coord_vocab_from_tokenizer

    model, tok, prompts = setup
    ids = torch.as_tensor(coord_vocab_from_tokenizer(tok).ids)
    is_coord = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    is_coord[ids] = True
    backend = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, coord_pick="expectation")
    assert backend.derive(temperature=0.0, batch_size=2).coord_pick == "expectation"
    coords_written = 0
    for p, out in zip(prompts[:3], backend.generate(prompts[:3])):
        seq = torch.cat([p.input_ids, torch.tensor(out.token_ids)])[None]
        mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(out.token_ids), dtype=torch.long)])[None]
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), pixel_values=p.pixel_values,
                           image_grid_thw=p.image_grid_thw, mm_token_type_ids=mm).logits[0].float()
        model.model.rope_deltas = None
        for t, chosen in enumerate(out.token_ids):
            z = logits[len(p) - 1 + t]
            mass, best_text = torch.logsumexp(z[ids], -1), z[~is_coord].max()
            lp = torch.log_softmax(z, -1)
            assert out.token_logprobs[t] == pytest.approx(float(lp[chosen]), abs=1e-4)  # raw log-prob, as always
            if is_coord[chosen]:
                coords_written += 1
                assert mass >= best_text
                expected = float((torch.softmax(z[ids], -1) * torch.arange(len(ids))).sum())
                assert chosen == int(ids[round(expected)])
            else:
                assert z[chosen] == best_text and z[chosen] >= mass
    assert coords_written > 0


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
    with pytest.raises(ValueError, match="rollout_matching.batch_size"):
        HFGenerationBackend(model, tok, max_new_tokens=4, batch_size="many")
    with pytest.raises(ValueError, match="rollout_matching.hf.cache"):
        HFGenerationBackend(model, tok, max_new_tokens=4, cache="paged")
    with pytest.raises(ValueError, match="rollout_matching.hf.compile"):
        HFGenerationBackend(model, tok, max_new_tokens=4, compile="yes")
    with pytest.raises(ValueError, match="needs rollout_matching.hf.cache: static"):
        HFGenerationBackend(model, tok, max_new_tokens=4, cache="dynamic", compile="always")
    with pytest.raises(ValueError, match="rollout_matching.decoding.coord_pick"):
        HFGenerationBackend(model, tok, max_new_tokens=4, coord_pick="mode")


def test_static_cache_matches_dynamic_cache_greedy(setup):
    """The fast mode (static KV cache, length-sorted batches of 3) generates exactly what the reference
    mode (dynamic cache) does, and returns the outputs in prompt order."""
    model, tok, prompts = setup
    ref = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, cache="dynamic").generate(prompts)
    fast_backend = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=3, cache="static", compile="never")
    fast = fast_backend.generate(prompts)
    assert fast_backend.last_stats["batches"] == 3 and fast_backend.last_stats["batch_size"] == 3
    assert [o.token_ids for o in fast] == [o.token_ids for o in ref]
    for a, b in zip(fast, ref):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.finished == b.finished
    # order is restored whatever order the prompts come in
    rev = fast_backend.generate(prompts[::-1])
    assert [o.token_ids for o in rev] == [o.token_ids for o in fast][::-1]


def test_batch_stops_when_every_row_has_ended(setup):
    """Early exit: once every row of a batch has produced an eos, the batch stops decoding."""
    model, tok, prompts = setup
    free = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8).generate(prompts)
    firsts = sorted({o.token_ids[0] for o in free})
    backend = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, eos_token_ids=firsts)
    out = backend.generate(prompts)
    assert backend.last_stats["decode_steps"] == [1]
    assert all(o.token_ids == f.token_ids[:1] and o.finished for o, f in zip(out, free))
    assert HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8).generate(prompts) == free
    assert all(len(o.token_ids) == MAX_NEW for o in free if not o.finished)


class _P:
    """Stand-in prompt: a length and whether it has an image."""

    def __init__(self, n, image=True):
        self.n = n
        self.pixel_values = torch.ones(1, 1) if image else None

    def __len__(self):
        return self.n


def test_length_sorted_batches_by_hand():
    prompts = [_P(5), _P(9), _P(7), _P(3, image=False), _P(9), _P(8, image=False), _P(1)]
    # images first, longest first (ties keep prompt order), then the text-only prompts
    assert length_sorted_batches(prompts, 2) == [[1, 4], [2, 0], [6], [5, 3]]
    assert length_sorted_batches(prompts, 10) == [[1, 4, 2, 0, 6], [5, 3]]
    assert length_sorted_batches(prompts, 1) == [[1], [4], [2], [0], [6], [5], [3]]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches(prompts, 0)


def test_estimate_batch_size_by_hand():
    # Qwen3-VL-2B text shape: 28 layers, 8 KV heads x 128, hidden 2048, MLP 6144, vocab 151,936, bf16.
    kv = 2 * 28 * 8 * 128 * 2
    assert kv == 114_688
    per_row = kv * (1000 + 256) + 1000 * (4 * 2048 + 3 * 6144) * 2 + 16 * 151_936
    assert per_row == 144_048_128 + 53_248_000 + 2_430_976
    kwargs = dict(prompt_len=1000, max_new_tokens=256, kv_per_token=kv, hidden_size=2048, intermediate_size=6144,
                  vocab_size=151_936, elem_bytes=2)
    free = 40 * 2**30
    assert estimate_batch_size(free_bytes=free, **kwargs) == int(0.8 * free // per_row) == 172
    assert estimate_batch_size(free_bytes=free, fraction=0.5, **kwargs) == 107
    assert estimate_batch_size(free_bytes=10**12, **kwargs) == 256  # the cap
    assert estimate_batch_size(free_bytes=10, **kwargs) == 1  # never below one


def test_kv_bytes_per_token_and_auto_batch_on_cpu(setup):
    model, tok, prompts = setup
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert kv_bytes_per_token(model) == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # fp32
    assert kv_bytes_per_token(model, torch.bfloat16) == kv_bytes_per_token(model) // 2
    backend = HFGenerationBackend(model, tok, max_new_tokens=2, batch_size="auto")
    backend.generate(prompts)
    assert backend.last_stats["batch_size"] == AUTO_BATCH_NO_CUDA  # no CUDA: the fixed fallback
    # cache auto: dynamic off CUDA, static when compiling anyway
    assert backend.last_stats["cache"] == "dynamic"
    assert HFGenerationBackend(model, tok, max_new_tokens=2, compile="always").cache_mode() == "static"
    assert HFGenerationBackend(model, tok, max_new_tokens=2, cache="static").cache_mode() == "static"


def test_trim_at_eos():
    out = trim_at_eos([5, 7, 2, 9], [-0.1, -0.2, -0.3, -0.4], [2, 3])
    assert (out.token_ids, out.token_logprobs, out.finished) == ([5, 7, 2], [-0.1, -0.2, -0.3], True)
    out = trim_at_eos([5, 7], [-0.1, -0.2], [2])
    assert (out.token_ids, out.finished) == ([5, 7], False)
    assert trim_at_eos([], [], [2]).finished is False


def test_factory_builds_the_configured_backend(setup):
    from configs import load_config

    model, tok, _ = setup
    cfg = load_config("configs/demo/stage2_shapes.yaml", ["rollout_matching.hf.cache=dynamic",
                                                          "rollout_matching.decoding.batch_size=auto"])
    backend = make_generation_backend(cfg.rollout_matching, model, tok)
    assert isinstance(backend, HFGenerationBackend)
    assert (backend.cache, backend.compile, backend.batch_size) == ("dynamic", "auto", "auto")
    assert make_generation_backend(load_config("configs/demo/stage2_shapes.yaml").rollout_matching, model, tok).cache == "auto"
    assert backend.max_new_tokens == cfg.rollout_matching.decoding.max_new_tokens
    greedy = backend.derive(temperature=0.0, batch_size=3)
    assert (greedy.temperature, greedy.batch_size, greedy.cache) == (0.0, 3, "dynamic")
    assert backend.coord_pick == "argmax"
    exp = load_config("configs/demo/stage2_shapes.yaml", ["rollout_matching.decoding.coord_pick=expectation"])
    assert make_generation_backend(exp.rollout_matching, model, tok).coord_pick == "expectation"


@pytest.mark.slow
def test_compiled_static_decode_matches_dynamic_on_cpu(setup):
    """``hf.compile: always`` runs transformers' compiled decode step on CPU too (inductor; ~2 min to
    compile on a 2-core box, hence slow). Same greedy tokens as the eager dynamic-cache reference."""
    model, tok, prompts = setup
    ref = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, cache="dynamic").generate(prompts)
    out = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, compile="always").generate(prompts)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    for a, b in zip(out, ref):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-3)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_sdpa_packed_model_generates_what_sdpa_does(setup, cache):
    """A model loaded with sdpa_packed (the CPU default) generates through transformers' sdpa: same tokens
    and log-probs, padded batches and KV caches included."""
    import copy

    from model import packed_attention

    model, tok, prompts = setup
    packed_attention.register()
    packed = copy.deepcopy(model)
    packed.set_attn_implementation(packed_attention.NAME)
    ref = HFGenerationBackend(model, tok, max_new_tokens=MAX_NEW, batch_size=8, cache=cache, compile="never").generate(prompts)
    out = HFGenerationBackend(packed, tok, max_new_tokens=MAX_NEW, batch_size=8, cache=cache, compile="never").generate(prompts)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    for a, b in zip(out, ref):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
