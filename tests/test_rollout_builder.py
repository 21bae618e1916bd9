"""Rollout sequence builder, post-rollout packing and rollout counters (tiny BPE and real Qwen BPE)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from configs.modules import TokenCEWeights
from core.vocab import COORD, DESC, EOS, FN, FP, IGNORE, MATCHED, NO_SUBSET, STRUCT
from data.coordjson import coord_token, render_answer
from data.encoding import ChatEncoder
from data.packing import PackingError
from data.types import GTObject, Record
from losses.masks import build_token_ce_weights
from model.tiny import build_tiny_image_processor, build_tiny_tokenizer
from model.vocab import coord_vocab_from_tokenizer
from rollout.builder import build_rollout_sample
from rollout.matching import hungarian_match
from rollout.metrics import rollout_counters
from rollout.packing import pack_rollout_samples
from rollout.parser import parse_rollout
from rollout.types import rollout_view
from tests._coordjson import parse_answer
from tests._data_fixtures import image_processor as qwen_image_processor
from tests._data_fixtures import qwen_tokenizer, write_png

IM_END = "<|im_end|>"


@functools.lru_cache(maxsize=1)
def _tiny():
    return build_tiny_tokenizer()


@functools.lru_cache(maxsize=2)
def _setup(name: str, png: str):
    tok = _tiny() if name == "tiny" else qwen_tokenizer()
    proc = build_tiny_image_processor() if name == "tiny" else qwen_image_processor()
    enc = ChatEncoder(tok, proc, prompt="Detect all objects.")
    return tok, coord_vocab_from_tokenizer(tok), enc


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    return write_png(os.path.join(tmp_path_factory.mktemp("img"), "a.png"), 64, 64)


@pytest.fixture(params=["tiny", "qwen"])
def env(request, png):
    tok, cv, enc = _setup(request.param, png)
    return tok, cv, enc, request.param


GT0 = GTObject("black cat", (100, 100, 300, 300))
GT1 = GTObject("dog}", (500, 500, 700, 800))
GT2 = GTObject('a "red" car', (10, 600, 200, 900))


def C(*bins):
    return ", ".join(coord_token(b) for b in bins)


def pred(desc, *bins):
    return '{"desc": "' + desc + '", "bbox_2d": [' + C(*bins) + "]}"


def record(png, objects):
    return Record(png, 64, 64, tuple(objects), "img0", "rollout_test.jsonl:1")


def build(env_, png, gen_text, gt, ids=None):
    tok, cv, enc, _ = env_
    rec = record(png, gt)
    prompt = enc.encode_prompt(rec)
    gen = ids if ids is not None else tok(gen_text, add_special_tokens=False)["input_ids"]
    parsed = parse_rollout(gen, tok, cv)
    match = hungarian_match(parsed.pred_bins, [o.bins for o in gt])
    s = build_rollout_sample(prompt, gen, parsed, match, gt, tok, cv)
    return s, parsed, match, prompt


def answer_text(tok, s):
    """Decoded answer tokens (after the prompt, without <|im_end|>)."""
    ids = s.input_ids[s.prompt_len : -1].tolist()
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def masks(s, weights):
    return build_token_ce_weights(
        "rollout",
        s.token_types[None],
        weights,
        subset=s.subset[None],
        closure=s.closure[None],
        dropped_invalid=torch.full((1, len(s)), s.dropped_invalid),
    )


def check_sample_invariants(s, tok):
    L = len(s)
    for name in ("token_types", "object_index", "subset", "coord_targets", "closure", "mm_token_type_ids"):
        assert getattr(s, name).shape == (L,), name
    P = s.prompt_len
    assert (s.token_types[:P] == IGNORE).all() and (s.subset[:P] == NO_SUBSET).all()
    assert s.input_ids[-1].item() == tok.convert_tokens_to_ids(IM_END) and s.token_types[-1].item() == EOS
    assert int(s.closure.sum()) == 1
    meta = rollout_view(s)
    assert meta.train_len == L and meta.eos_pos == L - 1 and meta.prompt_len == P
    assert s.closure[meta.tail_closure_pos] and meta.tail_closure_pos >= P + meta.prefix_len
    # coord tokens: exactly the positions with COORD type hold coord ids
    cv = coord_vocab_from_tokenizer(tok)
    assert torch.equal(cv.is_coord(s.input_ids[P:]), s.token_types[P:] == COORD)
    for g in s.bbox_groups:
        assert all(s.token_types[p] == COORD for p in g.coord_pos)
        assert [int(s.coord_targets[p]) for p in g.coord_pos] == list(g.target_bins)
        assert all(int(s.subset[p]) == g.subset for p in g.coord_pos)
    n_targets = int((s.coord_targets >= 0).sum())
    assert n_targets == 4 * len(s.bbox_groups)
    assert meta.tail_desc_pos == [p for p in range(P + meta.prefix_len, L) if s.token_types[p] == DESC]
    # desc tokens always lie inside an object span (masks would refuse orphan desc tokens)
    assert not ((s.token_types == DESC) & (s.subset == NO_SUBSET) & ~s.closure).any()


def test_matched_fp_fn_sequence(env, png):
    tok, cv, enc, name = env
    # pred A matches GT0 (IoU > 0.3, different bins), pred B is a valid FP, GT1/GT2 are FN
    a = pred("black cat", 110, 100, 300, 310)
    b = pred("ghost", 900, 10, 990, 90)
    gen_text = '{"objects": [' + a + ", " + b + "]}" + IM_END
    s, parsed, match, prompt = build(env, png, gen_text, [GT0, GT1, GT2])
    check_sample_invariants(s, tok)
    assert match.pairs == [(0, 0)] and match.fp == [1] and match.fn == [1, 2]
    # the prompt is kept verbatim and the rollout prefix is never re-encoded
    P = prompt.prompt_len
    assert torch.equal(s.input_ids[:P], prompt.input_ids)
    gen = tok(gen_text, add_special_tokens=False)["input_ids"]
    assert s.input_ids[P : P + parsed.cut].tolist() == gen[: parsed.cut]
    # decoded answer = kept prefix objects + FN objects in GT order, valid CoordJSON
    text = answer_text(tok, s)
    assert text == '{"objects": [' + a + ", " + b + ", " + render_answer([GT1, GT2]).text[len('{"objects": [') :]
    objs = parse_answer(text)
    assert [o.desc for o in objs] == ["black cat", "ghost", "dog}", 'a "red" car']
    assert objs[0].bins == (110, 100, 300, 310) and objs[2].bins == GT1.bins
    # subsets per object span; object_index per token
    assert [o.desc for o in s.objects] == ["black cat", "ghost", "dog}", 'a "red" car']
    for k, want in enumerate([MATCHED, FP, FN, FN]):
        o = s.objects[k]
        assert set(s.subset[o.start : o.end].tolist()) == {want}
        assert set(s.object_index[o.start : o.end].tolist()) == {k}
    # coord targets: matched -> matched GT bins at the PREDICTED coord positions; FP -> -1; FN -> GT bins
    assert [int(s.coord_targets[p]) for p in s.objects[0].coord_pos] == list(GT0.bins)
    assert [cv.bin_of(int(s.input_ids[p])) for p in s.objects[0].coord_pos] == [110, 100, 300, 310]
    assert [int(s.coord_targets[p]) for p in s.objects[1].coord_pos] == [-1] * 4
    assert [int(s.coord_targets[p]) for p in s.objects[3].coord_pos] == list(GT2.bins)
    meta = rollout_view(s)
    assert [g.subset for g in meta.bbox_groups_prefix] == [MATCHED]
    assert [g.target_bins for g in meta.bbox_groups_fn] == [GT1.bins, GT2.bins]
    assert meta.prefix_coord_pos == list(s.objects[0].coord_pos)
    assert meta.prefix_coord_target_bins == list(GT0.bins)
    assert meta.fp_spans == [(s.objects[1].start, s.objects[1].end)]
    assert meta.prefix_len == parsed.cut and meta.n_dropped_invalid == 0 and not s.dropped_invalid
    assert meta.counters["matched"] == 1 and meta.counters["fp"] == 1 and meta.counters["fn_appended"] == 2
    assert s.closure[L_1 := len(s) - 2] and rollout_view(s).tail_closure_pos == L_1  # `]}` just before <|im_end|>

    # docs/training/METRICS_LOSSES.md weights, with non-default knobs so every rule is visible
    w = TokenCEWeights(rollout_matched_prefix_struct_weight=0.5, rollout_fn_desc_weight=0.7)
    m = masks(s, w)
    struct, desc = m.struct[0], m.desc[0]
    tt, sub = s.token_types, s.subset
    assert (struct[:P] == 0).all() and (desc[:P] == 0).all()  # prompt never supervised
    assert struct[-1] == 1.0 and struct[L_1] == 1.0  # <|im_end|> and the closure
    fp_o = s.objects[1]
    assert (struct[fp_o.start : fp_o.end] == 0).all() and (desc[fp_o.start : fp_o.end] == 0).all()
    mo = s.objects[0]
    for t in range(mo.start, mo.end):
        assert desc[t] == 0  # matched desc 0
        assert struct[t] == (0.5 if tt[t] == STRUCT else 0.0)  # matched struct, coord 0
    for o in s.objects[2:]:
        for t in range(o.start, o.end):
            if t == L_1:
                continue
            want_s = {STRUCT: 1.0, DESC: 0.0, COORD: 0.0}[int(tt[t])]
            want_d = {STRUCT: 0.0, DESC: 0.7, COORD: 0.0}[int(tt[t])]
            assert (struct[t], desc[t]) == (want_s, want_d)
    # prefix struct outside objects (container opening, separators) gets the matched-prefix weight
    outside = [t for t in range(P, len(s) - 2) if sub[t] == NO_SUBSET]
    assert outside and all(struct[t] == 0.5 for t in outside)
    assert tok.decode(s.input_ids[P : P + 1]).startswith('{"')
    assert set(meta.prefix_struct_pos) == {
        t for t in range(P, P + parsed.cut) if tt[t] == STRUCT and sub[t] != FP
    }
    assert all(desc[t] == pytest.approx(0.7) for t in meta.tail_desc_pos)
    # coord tokens never in token CE
    assert (struct[tt == COORD] == 0).all() and (desc[tt == COORD] == 0).all()


def test_invalid_object_in_the_middle_and_multiplier(env, png):
    tok, cv, enc, name = env
    a = pred("black cat", 100, 100, 300, 300)
    bad = '{"desc": "x", "bbox_2d": [' + C(1, 2, 3) + "]}"
    gen_text = '{"objects": [' + a + ", " + bad + "]}" + IM_END
    s, parsed, match, _ = build(env, png, gen_text, [GT0, GT1])
    check_sample_invariants(s, tok)
    assert [o.drop_reason for o in parsed.objects] == [None, "wrong_arity"]
    assert answer_text(tok, s) == '{"objects": [' + a + ", " + bad + ", " + render_answer([GT1]).text[13:]
    bad_span = s.objects[1]
    assert set(s.subset[bad_span.start : bad_span.end].tolist()) == {FP}
    assert rollout_view(s).fp_spans == [(bad_span.start, bad_span.end)]
    assert rollout_view(s).n_dropped_invalid == 1 and rollout_view(s).drop_reasons == {"wrong_arity": 1}
    assert s.dropped_invalid
    w = TokenCEWeights(rollout_drop_invalid_struct_ce_multiplier=2.0)
    m = masks(s, w)
    struct = m.struct[0]
    # the separators around the invalid object are supervised struct (times the multiplier)
    sep_tokens = [t for t in range(s.prompt_len, len(s) - 2) if s.subset[t] == NO_SUBSET and s.token_types[t] == STRUCT]
    assert sep_tokens and all(struct[t] == 2.0 for t in sep_tokens)
    assert (struct[bad_span.start : bad_span.end] == 0).all()
    # closure and eos are never multiplied
    assert struct[rollout_view(s).tail_closure_pos] == 1.0 and struct[-1] == 1.0
    fn_struct = [t for t in range(s.objects[2].start, s.objects[2].end) if s.token_types[t] == STRUCT]
    assert all(struct[t] == 2.0 for t in fn_struct if t != rollout_view(s).tail_closure_pos)


def test_no_container_equals_gt_teacher_forcing(env, png):
    tok, cv, enc, _ = env
    gt = [GT0, GT1, GT2]
    s, parsed, match, _ = build(env, png, "I cannot see anything." + IM_END, gt)
    check_sample_invariants(s, tok)
    assert not parsed.container_found and match.fn == [0, 1, 2]
    ref = enc.encode(record(s.record.image_path, gt))
    assert torch.equal(s.input_ids, ref.input_ids)
    assert torch.equal(s.token_types, ref.token_types)
    assert torch.equal(s.closure, ref.closure)
    assert torch.equal(s.coord_targets, ref.coord_targets)
    assert all(o.start == r.start and o.end == r.end for o, r in zip(s.objects, ref.objects))
    assert {int(x) for x in s.subset[s.prompt_len : -1].tolist()} <= {FN, NO_SUBSET}
    assert rollout_view(s).prefix_len == 0 and len(rollout_view(s).bbox_groups_fn) == 3 and rollout_view(s).cut_suffix == ""


def test_preamble_is_kept_as_untrained_context(env, png):
    tok, cv, enc, name = env
    a = pred("black cat", 110, 100, 300, 310)
    preamble = 'Answer (a "list" {of} boxes): '
    gen_text = preamble + '{"objects": [' + a + "]}" + IM_END
    s, parsed, match, _ = build(env, png, gen_text, [GT0, GT1])
    check_sample_invariants(s, tok)
    assert parsed.container_found and parsed.container_start == len(preamble) and match.pairs == [(0, 0)]
    assert "closure_scan_mismatch" not in rollout_view(s).counters  # the closure scan starts at the container
    assert answer_text(tok, s) == preamble + '{"objects": [' + a + ", " + render_answer([GT1]).text[13:]
    P = s.prompt_len
    pre_tokens = [t for t, (b, e) in enumerate(parsed.token_offsets) if e <= len(preamble)]
    assert pre_tokens and all(s.token_types[P + t] == IGNORE for t in pre_tokens)
    # nothing in the preamble is supervised: struct/desc CE weights are 0 there
    m = masks(s, TokenCEWeights())
    assert all(m.struct[0][P + t] == 0 and m.desc[0][P + t] == 0 for t in pre_tokens)
    assert all(P + t not in rollout_view(s).prefix_struct_pos for t in pre_tokens)


def test_empty_container_and_fused_cut(env, png):
    tok, cv, enc, name = env
    s, parsed, match, _ = build(env, png, '{"objects": []}' + IM_END, [GT0])
    check_sample_invariants(s, tok)
    assert answer_text(tok, s) == render_answer([GT0]).text
    assert parse_answer(answer_text(tok, s)) == [GT0]
    if name == "qwen":  # the kept prefix ends before the fused 'Ġ[]'; ' [' is re-tokenised in the tail
        assert parsed.cut == 3 and rollout_view(s).cut_suffix == " ["
    # empty rollout and empty GT: just `{"objects": []}`
    s, parsed, match, _ = build(env, png, '{"objects": []}' + IM_END, [])
    check_sample_invariants(s, tok)
    assert answer_text(tok, s) == '{"objects": []}' and s.bbox_groups == [] and s.objects == []


def test_truncated_rollout_with_fused_tail(env, png):
    tok, cv, enc, name = env
    a = pred("black cat", 100, 100, 300, 300)
    gen_text = '{"objects": [' + a + ', {"desc": "dog", "bbox_2d": [' + C(500, 500)
    s, parsed, match, _ = build(env, png, gen_text, [GT0, GT1])
    check_sample_invariants(s, tok)
    assert parsed.drop_reasons == {"truncated": 1} and not s.dropped_invalid
    text = answer_text(tok, s)
    assert parse_answer(text) == [GTObject("black cat", (100, 100, 300, 300)), GT1]
    if name == "qwen":
        assert rollout_view(s).cut_suffix == "]}"
    # the suffix `]}` belongs to the matched object: its tokens keep the MATCHED subset
    o = s.objects[0]
    assert set(s.subset[o.start : o.end].tolist()) == {MATCHED}
    assert o.end > s.prompt_len + parsed.cut  # the object's span continues into the suffix tokens


def test_build_rejects_inconsistent_inputs(env, png):
    tok, cv, enc, _ = env
    gen = tok('{"objects": [' + pred("a", 1, 1, 9, 9) + "]}", add_special_tokens=False)["input_ids"]
    parsed = parse_rollout(gen, tok, cv)
    prompt = enc.encode_prompt(record(png, [GT0]))
    good = hungarian_match(parsed.pred_bins, [GT0.bins])
    wrong = hungarian_match([], [GT0.bins])
    with pytest.raises(ValueError, match="partition"):
        build_rollout_sample(prompt, gen, parsed, wrong, [GT0], tok, cv)
    with pytest.raises(ValueError, match="gen_ids"):
        build_rollout_sample(prompt, gen[:-1], parsed, good, [GT0], tok, cv)


def test_pack_rollout_samples(png):
    env_ = _setup("tiny", png) + ("tiny",)
    tok = env_[0]
    samples = [
        build(env_, png, '{"objects": [' + pred("a", 1, 1, 9, 9) + "]}" + IM_END, [GT0])[0],
        build(env_, png, "nothing" + IM_END, [GT0, GT1])[0],
        build(env_, png, '{"objects": []}' + IM_END, [])[0],
    ]
    lengths = [len(s) for s in samples]
    max_len = max(lengths) + min(lengths)
    batches = pack_rollout_samples(samples, max_len, tok.pad_token_id)
    again = pack_rollout_samples(samples, max_len, tok.pad_token_id)
    seen = sorted(seg.sample_index for b in batches for seg in b.segments)
    assert seen == list(range(len(samples)))  # every sample exactly once; sample_index = its index in `samples`
    assert [[seg.sample_index for seg in b.segments] for b in batches] == [
        [seg.sample_index for seg in b.segments] for b in again
    ]
    for b in batches:
        assert b.input_ids.shape[1] <= max_len
        for seg in b.segments:
            smp = samples[seg.sample_index]
            row = b.input_ids[seg.row, seg.start : seg.start + seg.length]
            assert torch.equal(row, smp.input_ids)
            assert torch.equal(b.subset[seg.row, seg.start : seg.start + seg.length], smp.subset)
    assert len(pack_rollout_samples(samples, sum(lengths), tok.pad_token_id)) == 1
    with pytest.raises(PackingError, match=str(max(lengths))):
        pack_rollout_samples(samples, max(lengths) - 1, tok.pad_token_id)
    assert pack_rollout_samples([], 10, 0) == []


def test_rollout_counters(png):
    tok, cv, _ = _setup("tiny", png)
    texts = [
        '{"objects": [' + pred("cat", 100, 100, 300, 300) + ", " + pred("x", 900, 900, 950, 950) + "]}" + IM_END,
        '{"objects": [' + '{"desc": "y", "bbox_2d": [' + C(1, 2) + "]}, " + pred("z", 5, 5, 1, 1) + ", {",
        "nope",
    ]
    gts = [[GT0, GT1], [GT0], []]
    parsed = [parse_rollout(tok(t, add_special_tokens=False)["input_ids"], tok, cv) for t in texts]
    matches = [hungarian_match(p.pred_bins, [o.bins for o in g]) for p, g in zip(parsed, gts)]
    out = rollout_counters(parsed, matches, [len(g) for g in gts])
    assert out["rollout/matched_total"] == 1 and out["rollout/fp_total"] == 1 and out["rollout/fn_total"] == 2
    assert "rollout/fn_appended_total" not in out  # every FN GT object is appended: rollout/fn_total counts them
    assert out["rollout/gt_objects_total"] == 3 and out["rollout/valid_pred_objects_total"] == 2
    from training.aggregator import MetricAggregator

    agg = MetricAggregator()
    agg.add(out)
    step = agg.reduce()  # the rates, derived from the counters as the step's log has them
    assert step["rollout/precision"] == pytest.approx(1 / 2) and step["rollout/recall"] == pytest.approx(1 / 3)
    assert step["rollout/f1"] == pytest.approx(2 * 1 / (2 + 3))
    assert step["rollout/gt_per_sample"] == pytest.approx(1.0) and step["rollout/pred_per_sample"] == pytest.approx(2 / 3)
    assert step["rollout/parse_valid_rate"] == pytest.approx(1 / 3)
    assert out["rollout/drop_wrong_arity_count"] == 1 and out["rollout/drop_bbox_invalid_count"] == 1
    assert out["rollout/drop_truncated_count"] == 1 and out["rollout/drop_bad_json_count"] == 0
    assert out["rollout/container_missing_count"] == 1 and out["rollout/eos_missing_count"] == 2
    assert out["rollout/container_preamble_count"] == 0
    pre = parse_rollout(tok("Answer: " + texts[0], add_special_tokens=False)["input_ids"], tok, cv)
    out2 = rollout_counters([pre], [matches[0]], [2])
    assert out2["rollout/container_preamble_count"] == 1 and out2["rollout/_parse_valid_num"] == 0.0
    assert out2["rollout/matched_total"] == 1
    from training.aggregator import check_metric_key

    for k in out:
        check_metric_key(k)
    with pytest.raises(ValueError, match="one match"):
        rollout_counters(parsed, matches[:1], [2, 1, 0])
