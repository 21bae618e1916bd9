"""CoordJSON render/parse: exact docs/DATA.md text, per-char types and spans, strict parse, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.vocab import COORD, DESC, STRUCT
from data.coordjson import (
    coord_token,
    find_outermost_closure,
    parse_coord_token,
    render_answer,
    render_answer_text,
    render_objects_fragment,
)
from data.types import GTObject
from tests._coordjson import CoordJSONError, parse_answer

CAT = GTObject("black cat", (110, 310, 410, 705))
DOG = GTObject('a "quoted" dog}', (1, 2, 3, 4))


def test_render_exact_spec_text():
    r = render_answer([CAT])
    assert r.text == (
        '{"objects": [{"desc": "black cat", "bbox_2d": [<|coord_110|>, <|coord_310|>, <|coord_410|>, <|coord_705|>]}]}'
    )
    assert render_answer([]).text == '{"objects": []}'
    assert render_answer([]).char_types == [STRUCT] * len('{"objects": []}')


def test_render_two_objects_spans_and_char_types():
    r = render_answer([CAT, DOG])
    t = r.text
    first = '{"desc": "black cat", "bbox_2d": [<|coord_110|>, <|coord_310|>, <|coord_410|>, <|coord_705|>]}'
    second = '{"desc": "a \\"quoted\\" dog}", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}'
    assert t == '{"objects": [' + first + ", " + second + "]}"
    s0 = len('{"objects": [')
    s1 = s0 + len(first) + 2
    assert r.object_char_spans == [(s0, s0 + len(first)), (s1, s1 + len(second))]
    assert [t[a:b] for a, b in r.desc_char_spans] == ["black cat", 'a \\"quoted\\" dog}']
    assert [t[a:b] for a, b in r.coord_char_spans[1]] == ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]
    expected = [STRUCT] * len(t)
    for a, b in r.desc_char_spans:
        expected[a:b] = [DESC] * (b - a)
    for spans in r.coord_char_spans:
        for a, b in spans:
            expected[a:b] = [COORD] * (b - a)
    assert r.char_types == expected
    # the quotes around the desc value are struct
    a, b = r.desc_char_spans[1]
    assert t[a - 1] == '"' and t[b] == '"' and r.char_types[a - 1] == STRUCT and r.char_types[b] == STRUCT


def test_fragment_is_the_inside_of_the_array():
    full = render_answer([CAT, DOG])
    frag = render_objects_fragment([CAT, DOG])
    off = len('{"objects": [')
    assert '{"objects": [' + frag.text + "]}" == full.text
    assert [(a + off, b + off) for a, b in frag.object_char_spans] == full.object_char_spans
    assert full.char_types[off : off + len(frag.text)] == frag.char_types
    assert render_objects_fragment([]).text == ""


def test_coord_token_bounds():
    assert coord_token(0) == "<|coord_0|>" and coord_token(999) == "<|coord_999|>"
    assert coord_token(np.int64(7)) == "<|coord_7|>"
    for bad in (-1, 1000, 1.0, True):
        with pytest.raises(ValueError, match="0..999"):
            coord_token(bad)
    assert parse_coord_token("<|coord_42|>") == 42
    assert parse_coord_token("<|coord_042|>") is None and parse_coord_token("<|coord_42|> ") is None
    with pytest.raises(ValueError):
        render_answer([GTObject("x", (0, 0, 0, 1000))])


_OBJ3 = '{"objects": [{"desc": "a", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>'
_OBJ4 = _OBJ3 + ", <|coord_4|>]}"


# Each case is (prefix that parses, rest): the error offset must be len(prefix).
@pytest.mark.parametrize(
    "prefix,rest,expected",
    [
        ('{"objects": [', "}", "'{\"desc\": '"),
        ('{"objects": []}', " ", "end of text"),
        ("", '{"objects":[]}', "'{\"objects\": ['"),
        (_OBJ3, "]}]}", "', ' between"),
        (_OBJ3 + ", ", "<|coord_1000|>]}]}", "coord"),
        ('{"objects": [{"desc": ', '"\\u0061", "bbox_2d": [<|coord_1|>]}]}', "canonically escaped"),
        ('{"objects": [{"desc": ', '"a', "closing"),
        (_OBJ4, '{"desc"', "', ' before the next object"),
    ],
)
def test_parse_errors_give_offset_and_expectation(prefix, rest, expected):
    text, offset = prefix + rest, len(prefix)
    with pytest.raises(CoordJSONError) as ei:
        parse_answer(text)
    assert ei.value.offset == offset
    assert expected in str(ei.value) and f"char {offset}" in str(ei.value)


descs = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)) | st.sampled_from(list('"{}[]\\,: <|>\n\té猫🐱')),
    max_size=20,
)
bins = st.integers(0, 999)
objects = st.lists(st.builds(GTObject, descs, st.tuples(bins, bins, bins, bins)), max_size=4)


@settings(max_examples=150, deadline=None)
@given(objects)
def test_render_parse_round_trip(objs):
    r = render_answer(objs)
    assert parse_answer(r.text) == objs
    assert render_answer_text(objs) == r.text  # the text-only render of the length pass
    assert len(r.char_types) == len(r.text)
    for (a, b), o in zip(r.desc_char_spans, objs):
        assert r.text[a:b] == json.dumps(o.desc, ensure_ascii=False)[1:-1]
        assert set(r.char_types[a:b]) <= {DESC}
    for spans, o in zip(r.coord_char_spans, objs):
        assert [r.text[a:b] for a, b in spans] == [coord_token(k) for k in o.bins]


def test_find_outermost_closure_is_string_aware():
    text = '{"objects": [{"desc": "a } b { \\" c ]}", "bbox_2d": [<|coord_1|>, <|coord_2|>]}]}<|im_end|>'
    assert find_outermost_closure(text) == text.index("]}<|im_end|>") + 1
    # backslash before the closing quote of a string: escaped backslash, string still closes
    t2 = '{"objects": [{"desc": "x\\\\", "b": 1}]} trailing }'
    assert find_outermost_closure(t2) == t2.index("]} trailing") + 1
    # nested objects in an answer and leading text before the object
    t3 = 'sure: {"a": {"b": [1, {"c": "}"}]}} }'
    assert find_outermost_closure(t3) == len(t3) - 3


def test_find_outermost_closure_none_when_unclosed_or_only_inside_strings():
    assert find_outermost_closure('{"objects": [{"desc": "cat}"}') is None
    assert find_outermost_closure('"{}"') is None
    assert find_outermost_closure("") is None
    # A stray ']' that does not match is skipped instead of closing the object early.
    t = '{"objects": ]}'
    assert find_outermost_closure(t) == len(t) - 1
