"""Salvage parser on hand-written answers, on the tiny byte-level BPE AND the real Qwen BPE fixture."""

from __future__ import annotations

import functools

import pytest

from core.vocab import COORD, DESC, IGNORE, STRUCT
from data.coordjson import coord_token
from model.tiny import build_tiny_tokenizer
from model.vocab import coord_vocab_from_tokenizer
from rollout.parser import parse_rollout, token_pieces
from tests._data_fixtures import qwen_tokenizer


@functools.lru_cache(maxsize=1)
def _tiny():
    return build_tiny_tokenizer()


def _tok(name):
    tok = _tiny() if name == "tiny" else qwen_tokenizer()
    return tok, coord_vocab_from_tokenizer(tok)


@pytest.fixture(params=["tiny", "qwen"])
def tk(request):
    return _tok(request.param) + (request.param,)


def C(*bins):
    return ", ".join(coord_token(b) for b in bins)


def obj(desc, *bins, raw_desc=None):
    d = raw_desc if raw_desc is not None else desc
    return '{"desc": "' + d + '", "bbox_2d": [' + C(*bins) + "]}"


A = obj("black cat", 110, 310, 410, 705)
B = obj("dog", 5, 6, 50, 60)
IM_END = "<|im_end|>"


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def kept_text(tok, cv, ids, pr):
    """Text of the kept tokens + the cut suffix (what the builder continues from)."""
    return "".join(token_pieces(ids[: pr.cut], tok, cv)) + pr.cut_suffix


def check_invariants(pr, ids):
    n_text = pr.n_text_tokens
    assert 0 <= pr.cut <= n_text <= len(ids)
    assert 0 <= pr.cut_char <= len(pr.text)
    assert len(pr.char_types) == len(pr.text)
    pos = 0
    for s, e in pr.token_offsets:
        assert s == pos and e >= s
        pos = e
    assert pos == len(pr.text)
    kept_end = pr.token_offsets[pr.cut - 1][1] if pr.cut else 0
    assert pr.text[kept_end : pr.cut_char] == pr.cut_suffix
    for o in pr.objects:
        assert 0 <= o.token_start <= o.token_end <= n_text
        assert 0 <= o.char_start <= o.char_end <= len(pr.text)
        assert all(0 <= t < n_text for t in o.coord_pos)
        assert len(o.coord_pos) == len(o.bins)
        if o.kept:
            assert o.char_end <= pr.cut_char
            assert all(t < pr.cut for t in o.coord_pos)
        if o.desc_token_span is not None:
            assert o.token_start <= o.desc_token_span[0] <= o.desc_token_span[1] <= o.token_end
        assert o.valid == (o.drop_reason is None)


def test_clean_rollout(tk):
    tok, cv, name = tk
    text = '{"objects": [' + A + ", " + B + "]}"
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.container_found and pr.closed and pr.eos_found and pr.stop_reason == "closed"
    assert pr.eos_pos == len(ids) - 1 and pr.text == text and pr.trailing_text == ""
    assert [o.desc for o in pr.objects] == ["black cat", "dog"]
    assert [o.bins for o in pr.objects] == [(110, 310, 410, 705), (5, 6, 50, 60)]
    assert all(o.valid and o.kept for o in pr.objects)
    a0 = text.index(A)
    b0 = text.index(B)
    assert (pr.objects[0].char_start, pr.objects[0].char_end) == (a0, a0 + len(A))
    assert (pr.objects[1].char_start, pr.objects[1].char_end) == (b0, b0 + len(B))
    assert pr.objects[0].desc_char_span == (a0 + 10, a0 + 19)
    # coord positions are the ids of the coord tokens, in order
    assert [ids[t] for t in pr.objects[0].coord_pos] == [cv.token_id(b) for b in (110, 310, 410, 705)]
    # the append point is right after B's `}`
    assert pr.cut_char == b0 + len(B)
    assert kept_text(tok, cv, ids, pr) == '{"objects": [' + A + ", " + B
    # tiny BPE fuses `]}]}` (object close + container close): the cut falls inside it
    assert pr.cut_suffix == ("]}" if name == "tiny" else "")
    # char types: desc text DESC, coord tokens COORD, rest STRUCT
    assert set(pr.char_types[a0 + 10 : a0 + 19]) == {DESC}
    c = text.index(coord_token(110))
    assert set(pr.char_types[c : c + len(coord_token(110))]) == {COORD}
    assert pr.char_types[0] == STRUCT
    assert pr.parse_valid and pr.drop_reasons == {}


def test_trailing_garbage_after_closure(tk):
    tok, cv, _ = tk
    text = '{"objects": [' + A + ']} and {"objects": [' + B + "]}"
    ids = ids_of(tok, text + IM_END + "junk after eos")
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.closed and pr.stop_reason == "closed" and pr.eos_found
    assert pr.trailing_text == ' and {"objects": [' + B + "]}"
    assert len(pr.objects) == 1 and pr.objects[0].valid
    assert kept_text(tok, cv, ids, pr) == '{"objects": [' + A


def test_truncated_last_object(tk):
    tok, cv, name = tk
    text = '{"objects": [' + A + ', {"desc": "dog", "bbox_2d": [' + C(5, 6) + ", <|co"
    ids = ids_of(tok, text)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.container_found and not pr.closed and not pr.eos_found and pr.stop_reason == "end_of_text"
    assert [o.drop_reason for o in pr.objects] == [None, "truncated"]
    assert [o.kept for o in pr.objects] == [True, False]
    assert pr.objects[1].char_start == text.index('{"desc": "dog"') and pr.objects[1].char_end == len(text)
    assert pr.cut_char == text.index(A) + len(A)
    assert kept_text(tok, cv, ids, pr) == '{"objects": [' + A
    # A ends `]}` + `,` -> Qwen fuses `]},`: the kept tokens stop at A's last coord, suffix `]}`
    if name == "qwen":
        assert pr.cut_suffix == "]}"
        assert ids[pr.cut - 1] == cv.token_id(705)
    assert pr.drop_reasons == {"truncated": 1} and pr.n_invalid_dropped == 0 and not pr.parse_valid


def test_invalid_object_in_the_middle(tk):
    tok, cv, _ = tk
    bad = '{"desc": "x", "bbox_2d": [' + C(1, 2, 3) + "]}"
    text = '{"objects": [' + A + ", " + bad + ", " + B + "]}"
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert [o.drop_reason for o in pr.objects] == [None, "wrong_arity", None]
    assert all(o.kept for o in pr.objects)
    assert [o.index for o in pr.valid_objects] == [0, 2]
    assert pr.pred_bins == [(110, 310, 410, 705), (5, 6, 50, 60)]
    m = pr.objects[1]
    assert (m.char_start, m.char_end) == (text.index(bad), text.index(bad) + len(bad))
    assert m.bins == (1, 2, 3) and len(m.coord_pos) == 3
    assert kept_text(tok, cv, ids, pr) == '{"objects": [' + A + ", " + bad + ", " + B
    assert pr.n_invalid_dropped == 1 and pr.drop_reasons == {"wrong_arity": 1}


@pytest.mark.parametrize(
    "body, reason",
    [
        ('{"desc": "x", "bbox_2d": [' + C(1, 2, 3) + "]}", "wrong_arity"),
        ('{"desc": "x", "bbox_2d": [' + C(1, 2, 3, 4, 5) + "]}", "wrong_arity"),
        ('{"desc": "x", "bbox_2d": [' + C(50, 2, 3, 40) + "]}", "bbox_invalid"),
        ('{"desc": "x", "bbox_2d": [' + C(1, 50, 3, 40) + "]}", "bbox_invalid"),
        ('{"desc": "x", "bbox_2d": [1, 2, 3, 4]}', "non_coord_token"),
        ('{"bbox_2d": [' + C(1, 2, 3, 4) + "]}", "missing_desc"),
        ('{"desc": "", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "missing_desc"),
        ('{"desc": 7, "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "missing_desc"),
        ('{"desc": " \\t ", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "missing_desc"),  # whitespace only, as GT
        ('{"desc": "   ", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "missing_desc"),
        ('{"bbox_2d": [' + C(1, 2, 3, 4) + '], "desc": "x"}', "key_order"),
        ('{"desc": "x"}', "missing_bbox"),
        ('{"desc": "x", "bbox_2d": [' + C(1, 2, 3, 4) + '], "score": 1}', "unexpected_keys"),
        ('{"desc": "x", "desc": "y", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "unexpected_keys"),
        ('{"desc": "x" "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "bad_json"),
        ('{"desc": "a\\qb", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "bad_json"),
        ('{"desc": "a' + coord_token(3) + '", "bbox_2d": [' + C(1, 2, 3, 4) + "]}", "coord_in_desc"),
        ('{"desc": "x", "bbox_2d": [' + C(1, 2, 3, 4) + "}", "bad_json"),  # `]` missing: `}` is skipped, next `}` closes
    ],
)
def test_drop_reasons(body, reason):
    tok, cv = _tok("tiny")
    text = '{"objects": [' + body + ", " + B + "]}"
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    first = pr.objects[0]
    assert first.drop_reason == reason and not first.valid and first.kept
    assert pr.drop_reasons.get(reason, 0) >= 1


def test_key_order_violation_is_counted_and_not_a_prediction():
    tok, cv = _tok("qwen")
    swapped = '{"bbox_2d": [' + C(1, 2, 3, 4) + '], "desc": "x"}'
    text = '{"objects": [' + swapped + ", " + B + "]}"
    pr = parse_rollout(ids_of(tok, text + IM_END), tok, cv)
    assert [o.drop_reason for o in pr.objects] == ["key_order", None]
    assert pr.pred_bins == [(5, 6, 50, 60)] and pr.drop_reasons == {"key_order": 1} and not pr.parse_valid


@pytest.mark.parametrize("preamble", ["Answer: ", "Sure! Here are the boxes:\n", 'The "result" {is}: ', "  x "])
def test_text_before_the_container_salvages_the_first_container(tk, preamble):
    tok, cv, _ = tk
    text = preamble + '{"objects": [' + A + ", " + B + ']} then {"objects": [' + B + "]}"
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    start = len(preamble)
    assert pr.container_found and pr.container_start == start and pr.has_preamble
    assert pr.closed and pr.stop_reason == "closed" and pr.trailing_text == ' then {"objects": [' + B + "]}"
    assert [o.desc for o in pr.valid_objects] == ["black cat", "dog"]
    assert pr.objects[0].char_start == start + len('{"objects": [')
    assert set(pr.char_types[:start]) == {IGNORE} and pr.char_types[start] == STRUCT
    assert kept_text(tok, cv, ids, pr) == preamble + '{"objects": [' + A + ", " + B
    assert not pr.parse_valid  # a preamble is a format violation, even though the objects are used


def test_leading_whitespace_is_not_a_preamble(tk):
    tok, cv, _ = tk
    pr = parse_rollout(ids_of(tok, '  {"objects": [' + A + "]}" + IM_END), tok, cv)
    assert pr.container_found and pr.container_start == 0 and not pr.has_preamble and pr.parse_valid


def test_spelled_out_coord_text_is_not_a_coord_token():
    """`<|coord_5|>` written with ordinary BPE pieces is text, not the coord token."""
    tok, cv = _tok("qwen")
    head = ids_of(tok, '{"objects": [{"desc": "x", "bbox_2d": [')
    spelled = tok.convert_tokens_to_ids(["<", "|", "coord", "_", "5", "|", ">"])
    tail = ids_of(tok, ", " + C(2, 3, 4) + "]}]}")
    pr = parse_rollout(head + spelled + tail, tok, cv)
    assert pr.text.count("<|coord_5|>") == 1
    assert pr.objects[0].drop_reason == "non_coord_token"


def test_desc_with_brace_and_escaped_quotes(tk):
    tok, cv, name = tk
    raw = 'a \\"quoted\\" dog}'
    o = obj(None, 1, 2, 3, 4, raw_desc=raw)
    text = '{"objects": [' + o + ", " + B + "]}"
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    first = pr.objects[0]
    assert first.valid and first.desc == 'a "quoted" dog}'
    d0 = text.index(raw)
    assert first.desc_char_span == (d0, d0 + len(raw))
    assert first.char_end == text.index(o) + len(o)
    if name == "qwen":
        # Real BPE: the desc's last `}` and the struct `",` share one token.
        last = first.desc_token_span[1] - 1
        assert tok.convert_ids_to_tokens(ids[last]) == '}",'
    assert len(pr.objects) == 2 and pr.objects[1].valid


def test_empty_objects(tk):
    tok, cv, name = tk
    ids = ids_of(tok, '{"objects": []}' + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.container_found and pr.closed and pr.objects == [] and pr.parse_valid
    assert pr.cut_char == len('{"objects": [')
    assert kept_text(tok, cv, ids, pr) == '{"objects": ['
    if name == "qwen":  # 'Ġ[]' straddles the append point
        assert pr.cut == 3 and pr.cut_suffix == " ["


@pytest.mark.parametrize("text", ["Sorry, no objects.", "", '{"object": []}', '{"objects" [', '{"obj'])
def test_no_container(tk, text):
    tok, cv, _ = tk
    ids = ids_of(tok, text + IM_END)
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert not pr.container_found and pr.cut == 0 and pr.cut_char == 0 and pr.objects == []
    assert pr.stop_reason == "no_container" and pr.trailing_text == text and pr.eos_found


def test_hand_written_qwen_tokens_with_fused_cut():
    """Token list written by hand in Qwen BPE pieces: `]},` fused at the cut, then garbage."""
    tok, cv = _tok("qwen")
    pieces = ['{"', "objects", '":', 'Ġ[{"', "desc", '":', 'Ġ"', "cat", '",', 'Ġ"', "bbox", "_", "2", "d", '":', "Ġ["]
    ids = tok.convert_tokens_to_ids(pieces)
    for k, b in enumerate((10, 20, 30, 40)):
        ids.append(cv.token_id(b))
        if k < 3:
            ids += tok.convert_tokens_to_ids([",", "Ġ"])
    ids += tok.convert_tokens_to_ids(["]},", "Ġhello"])
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.objects[0].valid and pr.objects[0].bins == (10, 20, 30, 40)
    assert pr.objects[0].token_start == 3 and pr.objects[0].token_end == len(ids) - 1
    assert pr.stop_reason == "bad_element" and pr.trailing_text == "hello"
    assert pr.cut == len(ids) - 2 and pr.cut_suffix == "]}"
    assert not pr.eos_found


def test_multibyte_desc_split_over_byte_tokens():
    tok, cv = _tok("tiny")
    text = '{"objects": [' + obj("café 中", 1, 2, 3, 4) + "]}"
    ids = ids_of(tok, text + IM_END)
    pieces = token_pieces(ids[:-1], tok, cv)
    assert "".join(pieces) == text
    assert "" in pieces  # the first byte of a split character carries no text
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.objects[0].valid and pr.objects[0].desc == "café 中"


class _FakeByteLevel:
    """Minimal byte-level tokenizer whose vocabulary has a token `}` + lead byte of `é` (0xC3)."""

    class _Dec:
        def __getstate__(self):
            return b'{"type": "ByteLevel"}'

    class _Backend:
        decoder = None

    def __init__(self, pieces: list[bytes], coord_first: int):
        from rollout.parser import _bytes_to_unicode

        table = _bytes_to_unicode()
        self.vocab = ["".join(table[b] for b in p) for p in pieces]
        self.backend_tokenizer = self._Backend()
        self.backend_tokenizer.decoder = self._Dec()
        self.coord_first = coord_first
        self.eos_token_id = coord_first - 1
        self.unk_token_id = None
        self.added_tokens_decoder = {}

    def __len__(self):
        return len(self.vocab)

    def convert_ids_to_tokens(self, i):
        return self.vocab[i] if 0 <= i < len(self.vocab) else None

    def convert_tokens_to_ids(self, t):
        return None


def test_cut_never_keeps_half_a_character():
    """A kept token may not end with bytes of a character completed after the cut."""
    from model.vocab import CoordVocab

    texts = [b'{"objects": [{"desc": "x", "bbox_2d": [', b", ", b"]", b"}\xc3", b"\xa9"]
    tok = _FakeByteLevel(texts, coord_first=100)
    cv = CoordVocab(first_id=100)
    head, sep, rb, brace_lead, tail_byte = range(5)
    ids = [head, 101, sep, 102, sep, 103, sep, 104, rb, brace_lead, tail_byte]
    pieces = token_pieces(ids, tok, cv)
    assert pieces[-2:] == ["}", "é"]  # the character goes to the token that completes it
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.objects[0].valid and pr.objects[0].bins == (1, 2, 3, 4)
    assert pr.cut_char == len(pr.text) - 1  # right after `}`
    # the `}` token also holds the first byte of `é`: it is not kept, `}` comes back as suffix
    assert pr.cut == len(ids) - 2 and pr.cut_suffix == "}"
    # an unfinished character at the end of the generation becomes U+FFFD, never an exception
    pr2 = parse_rollout(ids[:-1], tok, cv)
    check_invariants(pr2, ids[:-1])
    assert pr2.text.endswith("}\ufffd") and pr2.cut_suffix == "}"


def test_unknown_ids_and_specials_do_not_crash():
    tok, cv = _tok("tiny")
    ids = ids_of(tok, '{"objects": [' + A + ", ") + [10**6, -5] + ids_of(tok, "<|im_start|>" + B + "]}")
    pr = parse_rollout(ids, tok, cv)
    check_invariants(pr, ids)
    assert pr.objects[0].valid and pr.stop_reason == "bad_element"
    assert kept_text(tok, cv, ids, pr) == '{"objects": [' + A


def test_eos_id_override_and_whitespace_tolerance():
    tok, cv = _tok("tiny")
    text = ' {\n"objects" :[ ' + A + " ,\n" + B + " ] }"
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = ids_of(tok, text) + [end] + ids_of(tok, "zzz")
    pr = parse_rollout(ids, tok, cv, eos_token_id=end)
    check_invariants(pr, ids)
    assert pr.eos_found and pr.closed and [o.valid for o in pr.objects] == [True, True]
    assert pr.cut_char == text.index(B) + len(B)


def test_zero_width_and_zero_height_boxes_are_valid(tk):
    # x1 == x2 or y1 == y2 is a degenerate but valid box (as in the GT contract); only x2 < x1 or
    # y2 < y1 is bbox_invalid
    tok, cv, _ = tk
    text = '{"objects": [' + obj("line", 5, 6, 5, 60) + ", " + obj("flat", 5, 6, 50, 6) + ", " + obj("dot", 7, 7, 7, 7) + "]}"
    pr = parse_rollout(ids_of(tok, text + IM_END), tok, cv)
    assert [o.drop_reason for o in pr.objects] == [None, None, None]
    assert pr.pred_bins == [(5, 6, 5, 60), (5, 6, 50, 6), (7, 7, 7, 7)] and pr.parse_valid


def test_the_id_just_past_the_coord_block_is_not_a_coord(tk):
    # coord ids are [first_id, end_id): end_id would read as <|coord_1000|>, first_id - 1 as <|coord_-1|>
    tok, cv, _ = tk
    assert token_pieces([cv.end_id - 1, cv.end_id], tok, cv) == [coord_token(999), "\ufffd"]
    assert token_pieces([cv.first_id], tok, cv) == [coord_token(0)]
    assert token_pieces([cv.first_id - 1], tok, cv) != [coord_token(0)]
    head = ids_of(tok, '{"objects": [{"desc": "x", "bbox_2d": [' + C(1, 2, 3) + ", ")
    tail = ids_of(tok, "]}, " + B + "]}" + IM_END)
    for bad in (cv.end_id, cv.first_id - 1):
        ids = head + [bad] + tail
        pr = parse_rollout(ids, tok, cv)
        check_invariants(pr, ids)
        first = pr.objects[0]
        assert first.drop_reason == "non_coord_token" and first.bins == (1, 2, 3)
        assert ids.index(bad) not in first.coord_pos
        assert pr.pred_bins == [(5, 6, 50, 60)]
    # the last bin itself is a coord
    ids = head + [cv.end_id - 1] + tail
    assert parse_rollout(ids, tok, cv).pred_bins == [(1, 2, 3, 999), (5, 6, 50, 60)]
