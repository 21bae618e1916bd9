"""Token-type assignment, outermost-closure scan and char→token spans (docs/training/METRICS_LOSSES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.vocab import COORD, DESC, EOS, IGNORE, STRUCT
from data.coordjson import find_outermost_closure
from data.tokens import assign_token_types, char_span_to_tokens

S, D, C, E = STRUCT, DESC, COORD, EOS


def test_majority_type_wins_for_fused_desc_struct_token():
    # chars: 'dog}' desc, '",' struct; tokens: 'dog' | '}",'
    char_types = [D, D, D, D, S, S]
    assert assign_token_types([(0, 3), (3, 6)], char_types) == [D, S]


def test_tie_goes_to_desc_over_struct_and_coord_over_desc():
    # 'a"' : 1 desc + 1 struct -> desc (tie order COORD, DESC, STRUCT, EOS)
    assert assign_token_types([(0, 2)], [D, S]) == [D]
    assert assign_token_types([(0, 2)], [S, D]) == [D]
    assert assign_token_types([(0, 2)], [C, D]) == [C]
    assert assign_token_types([(0, 2)], [S, E]) == [S]


def test_zero_width_and_out_of_text_tokens_are_struct_and_ignore_chars_do_not_vote():
    char_types = [IGNORE, IGNORE, D, S]
    out = assign_token_types([(1, 1), (10, 12), (0, 2), (1, 3), (1, 4)], char_types)
    # (0,2) covers only untyped chars -> IGNORE; (1,3) one desc char -> DESC; (1,4) desc vs struct tie -> DESC
    assert out == [S, S, IGNORE, D, D]
    assert assign_token_types([], []) == []


def test_unknown_char_type_raises():
    with pytest.raises(ValueError, match="not a registry token type"):
        assign_token_types([(0, 1)], [7])


def _typed_answer():
    """An answer string + per-char types built by hand (desc value chars are DESC)."""
    parts = [
        ('{"objects": [{"desc": "', S),
        ('a \\"quoted\\" dog}', D),
        ('", "bbox_2d": [', S),
        ("<|coord_1|>", C), (", ", S), ("<|coord_2|>", C), (", ", S),
        ("<|coord_3|>", C), (", ", S), ("<|coord_4|>", C),
        ('], "x": 0}, {"desc": "', S),
        ("cat", D),
        ('", "bbox_2d": [', S),
        ("<|coord_5|>", C), (", ", S), ("<|coord_6|>", C), (", ", S),
        ("<|coord_7|>", C), (", ", S), ("<|coord_8|>", C),
        ("]}]}", S),
        ("<|im_end|>", E),
    ]
    text = "".join(p for p, _ in parts)
    types = [t for p, t in parts for _ in p]
    return text, types


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "qwen_tokenizer")
    tok.add_special_tokens({"additional_special_tokens": [f"<|coord_{k}|>" for k in range(1000)]})
    return tok


def test_real_qwen_tokenizer_answer_types(qwen_tok):
    text, char_types = _typed_answer()
    enc = qwen_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    pieces = [text[s:e] for s, e in offsets]
    types = assign_token_types(offsets, char_types)
    by_piece = list(zip(pieces, types))
    # The fused token: desc '}' + struct '",' -> struct (2 chars vs 1).
    assert ('}",', S) in by_piece
    assert (" \\\"", D) in by_piece and ("quoted", D) in by_piece and (" dog", D) in by_piece
    assert ("cat", D) in by_piece
    coord_tokens = [p for p, t in by_piece if t == C]
    assert coord_tokens == [f"<|coord_{k}|>" for k in range(1, 9)]
    assert pieces[-3:] == ["]}", "]}", "<|im_end|>"]
    assert types[-3:] == [S, S, E]
    assert types.count(E) == 1
    # Every token got a real type.
    assert set(types) <= {S, D, C, E}

    # The outermost '}' sits inside the second-to-last token ']}' (not "the last '}' token").
    close = find_outermost_closure(text)
    assert text[close] == "}" and close == text.index("<|im_end|>") - 1
    first, stop = char_span_to_tokens(offsets, close, close + 1)
    assert (first, stop) == (len(pieces) - 2, len(pieces) - 1)


def test_char_span_to_tokens():
    offsets = [(0, 2), (2, 5), (5, 5), (5, 9), (9, 10)]
    assert char_span_to_tokens(offsets, 3, 6) == (1, 4)
    assert char_span_to_tokens(offsets, 0, 10) == (0, 5)
    assert char_span_to_tokens(offsets, 9, 10) == (4, 5)
    assert char_span_to_tokens(offsets, 4, 4) == (1, 1)  # empty span -> empty range at the token holding it
    assert char_span_to_tokens(offsets, 20, 22) == (5, 5)
    with pytest.raises(ValueError):
        char_span_to_tokens(offsets, 5, 3)
