"""Chat encoding on the REAL Qwen BPE tokenizer: token types, object spans, closure, image pads."""

from __future__ import annotations

import unicodedata

import pytest
import torch

from core.vocab import COORD, DESC, EOS, IGNORE, STRUCT
from data.coordjson import coord_token_texts, render_answer
from data.encoding import ChatEncoder, EncodedRecords
from data.records import DataError
from data.types import GTObject, Record
from tests._data_fixtures import image_processor, qwen_tokenizer, write_png

S, D, C, E = STRUCT, DESC, COORD, EOS

DOG = GTObject('a "quoted" dog}', (110, 310, 410, 705))
CAT = GTObject("cat", (5, 6, 7, 8))

# Hand-written: answer tokens of [DOG, CAT] as real Qwen BPE splits them, with (type, object_index).
# `}",` fuses the desc's last char with the closing quote and comma: 2 of 3 chars are struct -> STRUCT.
# ` [{"` holds the container's ` [` and object 0's `{"`: it overlaps object 0, so object_index 0.
# The last `]}` is the objects array's `]` + the outermost `}` (the closure).
EXPECTED = [
    ('{"', S, -1), ("objects", S, -1), ('":', S, -1), ('Ġ[{"', S, 0),
    ("desc", S, 0), ('":', S, 0), ('Ġ"', S, 0),
    ("a", D, 0), ('Ġ\\"', D, 0), ("quoted", D, 0), ('\\"', D, 0), ("Ġdog", D, 0), ('}",', S, 0),
    ('Ġ"', S, 0), ("bbox", S, 0), ("_", S, 0), ("2", S, 0), ("d", S, 0), ('":', S, 0), ("Ġ[", S, 0),
    ("<|coord_110|>", C, 0), (",", S, 0), ("Ġ", S, 0), ("<|coord_310|>", C, 0), (",", S, 0), ("Ġ", S, 0),
    ("<|coord_410|>", C, 0), (",", S, 0), ("Ġ", S, 0), ("<|coord_705|>", C, 0), ("]},", S, 0),
    ('Ġ{"', S, 1), ("desc", S, 1), ('":', S, 1), ('Ġ"', S, 1), ("cat", D, 1), ('",', S, 1),
    ('Ġ"', S, 1), ("bbox", S, 1), ("_", S, 1), ("2", S, 1), ("d", S, 1), ('":', S, 1), ("Ġ[", S, 1),
    ("<|coord_5|>", C, 1), (",", S, 1), ("Ġ", S, 1), ("<|coord_6|>", C, 1), (",", S, 1), ("Ġ", S, 1),
    ("<|coord_7|>", C, 1), (",", S, 1), ("Ġ", S, 1), ("<|coord_8|>", C, 1), ("]}", S, 1),
    ("]}", S, -1), ("<|im_end|>", E, -1),
]  # fmt: skip


@pytest.fixture(scope="module")
def encoder():
    return ChatEncoder(qwen_tokenizer(), image_processor(), prompt="Detect all objects.")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = write_png(str(tmp_path_factory.mktemp("img") / "a.png"), 64, 48)
    return Record(path, 64, 48, (DOG, CAT), "a", "x.jsonl:1")


def test_every_coord_token_is_one_token():
    tok = qwen_tokenizer()
    texts = coord_token_texts()
    ids = tok("".join(texts), add_special_tokens=False)["input_ids"]
    assert ids == tok.convert_tokens_to_ids(texts) == list(range(151669, 151669 + 1000))


def test_prompt_is_chat_template_with_expanded_image_pads(encoder, record):
    p = encoder.encode_prompt(record)
    tok = qwen_tokenizer()
    assert encoder.prompt_text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect all objects.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # 64x48 with min 32*32 / max 64*64 pixels, factor 32: round(48/32)*32 = 64, 64 -> grid 4x4 patches of 16
    assert p.image_grid_thw.tolist() == [[1, 4, 4]]
    assert p.pixel_values.shape == (16, 3 * 2 * 16 * 16)
    toks = tok.convert_ids_to_tokens(p.input_ids.tolist())
    assert toks[:4] == ["<|im_start|>", "user", "Ċ", "<|vision_start|>"]
    assert toks[4:8] == ["<|image_pad|>"] * 4 and toks[8] == "<|vision_end|>"  # 16 patches / merge 2**2
    assert toks[-3:] == ["<|im_start|>", "assistant", "Ċ"]
    assert p.mm_token_type_ids.tolist() == [int(t == "<|image_pad|>") for t in toks]
    assert p.prompt_len == len(p) and (p.token_types == IGNORE).all()


def test_two_object_answer_types_spans_and_closure(encoder, record):
    s = encoder.encode(record)
    tok = qwen_tokenizer()
    p = s.prompt_len
    assert p == len(encoder.encode_prompt(record))
    toks = tok.convert_ids_to_tokens(s.input_ids[p:].tolist())
    assert toks == [t for t, _, _ in EXPECTED]
    assert s.token_types[p:].tolist() == [ty for _, ty, _ in EXPECTED]
    assert s.object_index[p:].tolist() == [oi for _, _, oi in EXPECTED]
    assert (s.token_types[:p] == IGNORE).all() and (s.object_index[:p] == -1).all()
    # closure: exactly the second `]}`, not the last token and not the last `}`-bearing object close
    closure = s.closure.nonzero().flatten().tolist()
    assert closure == [p + len(EXPECTED) - 2]
    # coord targets at coord positions only
    coord_pos = [p + i for i, (_, ty, _) in enumerate(EXPECTED) if ty == C]
    assert (s.coord_targets >= 0).nonzero().flatten().tolist() == coord_pos
    assert s.coord_targets[coord_pos].tolist() == [110, 310, 410, 705, 5, 6, 7, 8]
    # object spans: [start, end) over the tokens overlapping `{...}`; desc tokens overlapping the value
    o0, o1 = s.objects
    assert (o0.start, o0.end, o0.desc_start, o0.desc_end) == (p + 3, p + 31, p + 7, p + 13)
    assert (o1.start, o1.end, o1.desc_start, o1.desc_end) == (p + 31, p + 55, p + 35, p + 36)
    assert o0.coord_pos == tuple(coord_pos[:4]) and o1.coord_pos == tuple(coord_pos[4:])
    assert (o0.desc, o0.bins, o1.desc, o1.bins) == (DOG.desc, DOG.bins, CAT.desc, CAT.bins)
    assert [(g.coord_pos, g.target_bins, g.subset, g.object_index) for g in s.bbox_groups] == [
        (o0.coord_pos, DOG.bins, -1, 0),
        (o1.coord_pos, CAT.bins, -1, 1),
    ]
    assert (s.subset == -1).all() and not s.dropped_invalid and s.record is record
    for name in ("token_types", "object_index", "subset", "coord_targets", "closure", "mm_token_type_ids"):
        assert getattr(s, name).shape == s.input_ids.shape, name


def test_empty_answer(encoder, record):
    rec = Record(record.image_path, 64, 48, (), "e", "x.jsonl:2")
    s = encoder.encode(rec)
    tok = qwen_tokenizer()
    p = s.prompt_len
    toks = tok.convert_ids_to_tokens(s.input_ids[p:].tolist())
    assert tok.convert_tokens_to_string(toks[:-1]) == '{"objects": []}'
    assert toks[-1] == "<|im_end|>" and s.token_types[p:].tolist() == [S] * (len(toks) - 1) + [E]
    assert s.closure.sum() == 1 and s.closure[-2] and s.objects == [] and s.bbox_groups == []


def test_sample_length_predicts_encode_length(encoder, record, tmp_path):
    big = write_png(str(tmp_path / "big.png"), 200, 90)
    rec2 = Record(big, 200, 90, (CAT,), "b", "x.jsonl:3")
    lazy = EncodedRecords([record, rec2], encoder)
    assert lazy.lengths() == [len(encoder.encode(record)), len(encoder.encode(rec2))]
    assert len(lazy[1]) == lazy.lengths()[1] and lazy.sources() == ["x.jsonl:1", "x.jsonl:3"]


def test_min_max_pixels_change_the_grid(record):
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="p", min_pixels=96 * 96, max_pixels=128 * 128)
    s = enc.encode_prompt(record)
    # 64x48 rounds to 64x64 = 4096 < 9216 pixels: beta = sqrt(9216 / 3072) = sqrt(3);
    # h = ceil(48 * 1.732 / 32) * 32 = 96, w = ceil(64 * 1.732 / 32) * 32 = 128 -> 6 x 8 patches of 16
    assert s.image_grid_thw.tolist() == [[1, 6, 8]]
    assert int(s.mm_token_type_ids.sum()) == 48 // 4 and enc.sample_length(record) == len(enc.encode(record))


def test_system_prompt_and_image_size_mismatch(encoder, record):
    enc = ChatEncoder(qwen_tokenizer(), image_processor(), prompt="p", system_prompt="You detect.")
    assert enc.prompt_text.startswith("<|im_start|>system\nYou detect.<|im_end|>\n<|im_start|>user\n")
    wrong = Record(record.image_path, 65, 48, (), "w", "x.jsonl:9")
    with pytest.raises(DataError, match="x.jsonl:9.*65x48.*64x48"):
        encoder.encode(wrong)


def test_missing_special_or_coord_tokens_fail_with_fix(record):
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from tests._data_fixtures import CHAT_TEMPLATE, FIXTURE_DIR, QWEN3VL_SPECIAL_TOKENS

    tok = AutoTokenizer.from_pretrained(FIXTURE_DIR)
    tok.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="image_pad"):
        ChatEncoder(tok, image_processor(), prompt="p")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3VL_SPECIAL_TOKENS], special_tokens=True)
    enc = ChatEncoder(tok, image_processor(), prompt="p")
    with pytest.raises(ValueError, match="x.jsonl:1: coord token '<.coord_110.>' is not a single token"):
        enc.encode(record)


def test_tensor_dtypes(encoder, record):
    s = encoder.encode(record)
    assert s.input_ids.dtype == torch.long and s.closure.dtype == torch.bool
    assert s.image_grid_thw.dtype == torch.long and s.pixel_values.dtype == torch.float32


TRICKY_DESCS = ["}]}", 'a {"desc": "x"}', "back\\slash", "猫 🐱 cat", "e\u0301t\u00e9", "tab\tnew\nline", "  spaced  "]


def test_tricky_descs_keep_types_spans_and_closure(encoder, record):
    tok = qwen_tokenizer()
    objs = tuple(GTObject(d, (i, i + 1, i + 2, i + 3)) for i, d in enumerate(TRICKY_DESCS))
    s = encoder.encode(Record(record.image_path, 64, 48, objs, "t", "x.jsonl:4"))
    p = s.prompt_len
    ans_ids = s.input_ids[p:-1].tolist()
    r = render_answer(objs)
    ids, offsets = encoder.encode_answer_tokens(r.text)
    text = r.text
    assert ids == ans_ids
    # Qwen's tokenizer NFC-normalises: decomposed e + U+0301 comes back composed (read_jsonl stores NFC)
    assert tok.decode(ans_ids) == unicodedata.normalize("NFC", r.text)
    types = s.token_types[p:-1].tolist()
    for t, (a, b) in enumerate(offsets):
        inside_desc = any(ds <= a and b <= de for ds, de in r.desc_char_spans)
        if inside_desc and b > a:
            assert types[t] == DESC, (t, text[a:b])
    assert s.coord_targets[s.coord_targets >= 0].tolist() == [k for o in objs for k in o.bins]
    assert [o.desc for o in s.objects] == list(TRICKY_DESCS)
    # the closure is the token holding the final `}`: the `]}` before <|im_end|>
    (c,) = s.closure.nonzero().flatten().tolist()
    a, b = offsets[c - p]
    assert a <= len(r.text) - 1 < b and c == len(s) - 2


def test_prompts_of_equals_encode_prompt(encoder, record, tmp_path):
    """``prompts_of`` slices every segment's prompt out of a packed GT batch (images of different
    sizes, two samples in one row) and takes its record from the training set by sample index."""
    from data.encoding import prompts_of
    from data.packing import collate_rows

    big = write_png(str(tmp_path / "big.png"), 200, 90)
    records = [Record(big, 200, 90, (CAT,), "b", "x.jsonl:3"), record, Record(big, 200, 90, (), "c", "x.jsonl:4")]
    rows = [[2, 0], [1]]  # training-set indices, the order PackedDataset hands them to collate_rows
    batch = collate_rows([[encoder.encode(records[j]) for j in row] for row in rows], 0, indices=rows)
    assert [seg.sample_index for seg in batch.segments] == [2, 0, 1]
    prompts = prompts_of(batch, records)
    for j, a in zip([2, 0, 1], prompts, strict=True):
        b = encoder.encode_prompt(records[j])
        for name in ("input_ids", "token_types", "object_index", "subset", "coord_targets", "closure",
                     "mm_token_type_ids", "pixel_values", "image_grid_thw"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (j, name)
        assert a.prompt_len == b.prompt_len == len(a) and a.record == records[j]
