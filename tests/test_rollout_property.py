"""Property tests: thousands of random and mutated answers through the parser and the builder.

Nothing may escape as an exception, every span lies inside the sequence, ``cut <= len``, and the
built sequence always closes with the container's own `}` (the parser and the closure scan agree).
"""

from __future__ import annotations

import functools
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.modules import TokenCEWeights
from core.vocab import IGNORE, NO_SUBSET
from data.coordjson import render_answer
from data.types import EncodedSample, GTObject
from losses.masks import build_token_ce_weights
from model.tiny import build_tiny_tokenizer
from model.vocab import coord_vocab_from_tokenizer
from rollout.builder import build_rollout_sample
from rollout.matching import hungarian_match
from rollout.parser import parse_rollout, token_pieces
from rollout.types import rollout_view
from tests._data_fixtures import qwen_tokenizer
from tests.test_rollout_parser import check_invariants

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@functools.lru_cache(maxsize=2)
def _env(name):
    tok = build_tiny_tokenizer() if name == "tiny" else qwen_tokenizer()
    return tok, coord_vocab_from_tokenizer(tok)


def _prompt(n: int = 3) -> EncodedSample:
    ids = torch.arange(1, n + 1)
    z = torch.full((n,), -1, dtype=torch.long)
    return EncodedSample(
        input_ids=ids,
        token_types=torch.full((n,), IGNORE),
        object_index=z.clone(),
        subset=torch.full((n,), NO_SUBSET),
        coord_targets=z.clone(),
        closure=torch.zeros(n, dtype=torch.bool),
        mm_token_type_ids=torch.zeros(n, dtype=torch.long),
        pixel_values=torch.zeros(0),
        image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
        prompt_len=n,
    )


_desc = st.text(alphabet=st.sampled_from(list('ab }{[]"\\,:é中 ')), min_size=1, max_size=6)
_bin = st.integers(0, 999)


@st.composite
def _objects(draw, max_n=3):
    n = draw(st.integers(0, max_n))
    out = []
    for _ in range(n):
        x1, x2 = sorted((draw(_bin), draw(_bin)))
        y1, y2 = sorted((draw(_bin), draw(_bin)))
        out.append(GTObject(draw(_desc), (x1, y1, x2, y2)))
    return out


def _roundtrip(name, ids, gt):
    tok, cv = _env(name)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert "".join(token_pieces(ids[: pr.cut], tok, cv)) + pr.cut_suffix == pr.text[: pr.cut_char]
    match = hungarian_match(pr.pred_bins, [o.bins for o in gt])
    s = build_rollout_sample(_prompt(), ids, pr, match, gt, tok, cv)
    assert "closure_scan_mismatch" not in rollout_view(s).counters
    assert s.input_ids[3 : 3 + pr.cut].tolist() == list(ids[: pr.cut])
    # the container's `}` is the last answer character, so the closure is the last token before <|im_end|>
    assert rollout_view(s).tail_closure_pos == len(s) - 2
    assert s.closure.nonzero().flatten().tolist() == [len(s) - 2]
    for o in s.objects:
        assert 3 <= o.start <= o.end <= len(s) - 1
    m = build_token_ce_weights(
        "rollout", s.token_types[None], TokenCEWeights(), subset=s.subset[None], closure=s.closure[None]
    )
    assert m.struct[0, -1] == 1.0 and m.struct[0, rollout_view(s).tail_closure_pos] == 1.0
    return pr


_MUT_CHARS = list('{}[]",: \\<|>xé') + ["<|coord_7|>", "<|im_end|>", '"desc"', '"bbox_2d"', "]}", "}, {"]


@st.composite
def _mutated_text(draw):
    objs = draw(_objects())
    text = render_answer(objs).text
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["ins", "del", "trunc", "dup"]))
        i = draw(st.integers(0, len(text)))
        if op == "ins":
            text = text[:i] + draw(st.sampled_from(_MUT_CHARS)) + text[i:]
        elif op == "del":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif op == "trunc":
            text = text[:i]
        else:
            text = text[:i] + text[i // 2 : i] + text[i:]
    if draw(st.booleans()):
        text += "<|im_end|>" + draw(st.sampled_from(["", "junk", "]}"]))
    return text, draw(_objects())


@given(_mutated_text())
@settings(max_examples=300, **SETTINGS)
def test_mutated_text_tiny(case):
    text, gt = case
    tok, _ = _env("tiny")
    _roundtrip("tiny", tok(text, add_special_tokens=False)["input_ids"], gt)


@given(_mutated_text())
@settings(max_examples=100, **SETTINGS)
def test_mutated_text_qwen(case):
    text, gt = case
    tok, _ = _env("qwen")
    _roundtrip("qwen", tok(text, add_special_tokens=False)["input_ids"], gt)


@st.composite
def _mutated_ids(draw):
    tok, cv = _env("tiny")
    objs = draw(_objects())
    ids = tok(render_answer(objs).text, add_special_tokens=False)["input_ids"]
    any_id = st.integers(-3, len(tok) + 20)  # includes ids the tokenizer does not know
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(["ins", "del", "rep", "trunc"]))
        i = draw(st.integers(0, len(ids)))
        if op == "ins":
            ids = ids[:i] + [draw(any_id)] + ids[i:]
        elif op == "del":
            ids = ids[:i] + ids[i + 1 :]
        elif op == "rep" and i < len(ids):
            ids = ids[:i] + [draw(any_id)] + ids[i + 1 :]
        elif op == "trunc":
            ids = ids[:i]
    return ids, draw(_objects())


@given(_mutated_ids())
@settings(max_examples=300, **SETTINGS)
def test_mutated_token_ids_tiny(case):
    ids, gt = case
    _roundtrip("tiny", ids, gt)


@given(st.lists(st.integers(-2, 1700), max_size=40), _objects())
@settings(max_examples=250, **SETTINGS)
def test_random_token_ids_tiny(ids, gt):
    _roundtrip("tiny", ids, gt)


def test_seeded_fuzz_thousands_of_answers():
    """2000 mutated answers (text- and id-level), parser on all, builder on every 4th (cheap, no hypothesis)."""
    tok, cv = _env("tiny")
    rng = random.Random(1234)
    descs = ["cat", 'a "q"', "}x{", "é中", "b\\c", "[,]"]
    n_vocab = len(tok)

    def rand_objs():
        out = []
        for _ in range(rng.randint(0, 3)):
            x1, x2 = sorted(rng.randint(0, 999) for _ in range(2))
            y1, y2 = sorted(rng.randint(0, 999) for _ in range(2))
            out.append(GTObject(rng.choice(descs), (x1, y1, x2, y2)))
        return out

    for k in range(2000):
        text = render_answer(rand_objs()).text
        for _ in range(rng.randint(0, 3)):
            i = rng.randint(0, len(text))
            text = text[:i] + rng.choice(_MUT_CHARS + [""]) + text[i + rng.randint(0, 3) :]
        if rng.random() < 0.3:
            text = text[: rng.randint(0, len(text))]
        ids = tok(text + rng.choice(["", "<|im_end|>", "<|im_end|>x"]), add_special_tokens=False)["input_ids"]
        for _ in range(rng.randint(0, 2)):
            i = rng.randint(0, len(ids))
            ids = ids[:i] + [rng.randint(-2, n_vocab + 5)] + ids[i + rng.randint(0, 2) :]
        if k % 4 == 0:
            _roundtrip("tiny", ids, rand_objs())
        else:
            pr = parse_rollout(ids, tok, cv)
            check_invariants(pr, ids)


def test_clean_render_roundtrips_exactly():
    """Sanity of the property harness: an unmutated answer parses to its own objects."""
    tok, cv = _env("tiny")
    objs = [GTObject('a "b"}', (1, 2, 3, 4)), GTObject("中", (5, 6, 700, 800))]
    ids = tok(render_answer(objs).text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    pr = _roundtrip("tiny", ids, objs)
    assert [(o.desc, o.bins) for o in pr.objects] == [(o.desc, o.bins) for o in objs] and pr.parse_valid
