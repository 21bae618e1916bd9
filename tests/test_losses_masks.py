"""Per-context CE masks (docs/training/METRICS_LOSSES.md) against hand-written expectations."""

from __future__ import annotations

import pytest
import torch

from configs.modules import TokenCEWeights
from core.vocab import COORD, DESC, EOS, FN, FP, GT, IGNORE, MATCHED, NO_SUBSET, ROLLOUT, SELF_CONTEXT, STRUCT
from losses.masks import build_token_ce_weights, text_gate_positions

# X = IGNORE (prompt/padding), Z = NO_SUBSET (outside every object span)
S, D, C, E, X = STRUCT, DESC, COORD, EOS, IGNORE
M, F, N, Z = MATCHED, FP, FN, NO_SUBSET

# One rollout-context row: prompt, container opening, a matched object, an FP object, a dropped
# invalid object (FP), an appended FN object, the closure ']}' and <|im_end|>, one padding token.
#            prompt    open  matched------------  sep  fp----------  sep  invalid--  sep  fn----------------  close eos pad
TYPES = [X, X, X,  S,   S, D, S, C, C, S,    S,   S, D, C, S,   S,   S, D, S,   S,   S, D, S, C, S,   S,    E,  X]
SUBSET = [Z, Z, Z, Z,   M, M, M, M, M, M,    Z,   F, F, F, F,   Z,   F, F, F,   Z,   N, N, N, N, N,   Z,    Z,  Z]
CLOSURE_POS = 25
SEG = [0] * 27 + [-1]


def _rollout_inputs(subset=None):
    tt = torch.tensor([TYPES])
    sub = torch.tensor([subset or SUBSET])
    closure = torch.zeros_like(tt, dtype=torch.bool)
    closure[0, CLOSURE_POS] = True
    return tt, sub, closure, torch.tensor([SEG])


def _expect(struct_by_pos: dict[int, float], desc_by_pos: dict[int, float]):
    s = torch.zeros(1, len(TYPES))
    d = torch.zeros(1, len(TYPES))
    for p, w in struct_by_pos.items():
        s[0, p] = w
    for p, w in desc_by_pos.items():
        d[0, p] = w
    return s, d


PREFIX_STRUCT = [3, 4, 6, 9, 10, 15, 19]  # container, matched struct, separators
FN_STRUCT = [20, 22, 24]


def test_rollout_default_weights():
    tt, sub, closure, seg = _rollout_inputs()
    m = build_token_ce_weights(ROLLOUT, tt, TokenCEWeights(), subset=sub, closure=closure, segment_ids=seg)
    s, d = _expect({**dict.fromkeys(PREFIX_STRUCT + FN_STRUCT, 1.0), 25: 1.0, 26: 1.0}, {21: 1.0})
    torch.testing.assert_close(m.struct, s)
    torch.testing.assert_close(m.desc, d)
    # matched desc (5), FP (11-14), invalid (16-18) and every coord are 0 in both masks
    for p in [5, 7, 8, 11, 12, 13, 14, 16, 17, 18, 23]:
        assert m.struct[0, p] == 0 and m.desc[0, p] == 0
    gate = text_gate_positions(m)
    assert gate[0, 25] and not gate[0, 26] and gate[0, 21] and not gate[0, 5] and not gate[0, 23]


def test_rollout_fn_desc_weight_zero():
    tt, sub, closure, seg = _rollout_inputs()
    m = build_token_ce_weights(
        ROLLOUT, tt, TokenCEWeights(rollout_fn_desc_weight=0.0), subset=sub, closure=closure, segment_ids=seg
    )
    s, d = _expect({**dict.fromkeys(PREFIX_STRUCT + FN_STRUCT, 1.0), 25: 1.0, 26: 1.0}, {})
    torch.testing.assert_close(m.struct, s)
    torch.testing.assert_close(m.desc, d)


def test_rollout_matched_prefix_struct_zero_keeps_fn_closure_eos():
    tt, sub, closure, seg = _rollout_inputs()
    m = build_token_ce_weights(
        ROLLOUT, tt, TokenCEWeights(rollout_matched_prefix_struct_weight=0.0), subset=sub, closure=closure
    )
    s, d = _expect({**dict.fromkeys(FN_STRUCT, 1.0), 25: 1.0, 26: 1.0}, {21: 1.0})
    torch.testing.assert_close(m.struct, s)
    torch.testing.assert_close(m.desc, d)


def test_rollout_drop_invalid_multiplier_scales_struct_only():
    tt, sub, closure, seg = _rollout_inputs()
    dropped = torch.ones(tt.shape, dtype=torch.bool)
    m = build_token_ce_weights(
        ROLLOUT, tt, TokenCEWeights(rollout_drop_invalid_struct_ce_multiplier=2.0),
        subset=sub, closure=closure, dropped_invalid=dropped, segment_ids=seg,
    )
    s, d = _expect({**dict.fromkeys(PREFIX_STRUCT + FN_STRUCT, 2.0), 25: 1.0, 26: 1.0}, {21: 1.0})
    torch.testing.assert_close(m.struct, s)
    torch.testing.assert_close(m.desc, d)


def test_closure_fused_into_fp_span_is_still_supervised():
    subset = list(SUBSET)
    subset[CLOSURE_POS] = FP
    tt, sub, closure, _ = _rollout_inputs(subset)
    m = build_token_ce_weights(ROLLOUT, tt, TokenCEWeights(), subset=sub, closure=closure)
    assert m.struct[0, CLOSURE_POS] == 1.0 and m.struct[0, 26] == 1.0


@pytest.mark.parametrize("dropped", [False, True])
def test_closure_typed_desc_inside_a_missed_object_span_is_struct_1_desc_0(dropped):
    # A fused token holding the end of the last FN object's desc text and the outermost '}' is
    # typed DESC and lies in the FN span: it is supervised as the closure (struct exactly 1,
    # whatever the multipliers), never as FN desc text (desc 0, whatever rollout_fn_desc_weight).
    types, subset = list(TYPES), list(SUBSET)
    types[CLOSURE_POS], subset[CLOSURE_POS] = DESC, FN
    tt, sub, closure, seg = _rollout_inputs(subset)
    tt = torch.tensor([types])
    weights = TokenCEWeights(rollout_fn_desc_weight=0.7, rollout_drop_invalid_struct_ce_multiplier=2.0)
    m = build_token_ce_weights(ROLLOUT, tt, weights, subset=sub, closure=closure, segment_ids=seg,
                               dropped_invalid=torch.full(tt.shape, dropped))  # fmt: skip
    mult = 2.0 if dropped else 1.0
    s, d = _expect({**dict.fromkeys(PREFIX_STRUCT + FN_STRUCT, mult), 25: 1.0, 26: 1.0}, {21: 0.7})
    torch.testing.assert_close(m.struct, s)
    torch.testing.assert_close(m.desc, d)
    assert text_gate_positions(m)[0, CLOSURE_POS]

def test_rollout_requires_subset_and_closure_and_rejects_orphan_desc():
    tt, sub, closure, _ = _rollout_inputs()
    with pytest.raises(ValueError, match="subset= and closure="):
        build_token_ce_weights(ROLLOUT, tt, TokenCEWeights(), subset=sub)
    bad = list(SUBSET)
    bad[5] = NO_SUBSET
    with pytest.raises(ValueError, match="no object span"):
        build_token_ce_weights(ROLLOUT, tt, TokenCEWeights(), subset=torch.tensor([bad]), closure=closure)
    with pytest.raises(ValueError, match="allowed: gt, self_context, rollout"):
        build_token_ce_weights("teacher", tt, TokenCEWeights())


# Packed Stage-1 batch: row 0 holds two segments of 7 tokens, row 1 one segment of 6 + padding.
PACKED_TYPES = torch.tensor([
    [X, X, S, D, C, S, E, X, S, D, D, C, S, E],
    [X, X, S, D, S, E, X, X, X, X, X, X, X, X],
])
PACKED_SEG = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1],
])


def test_stage1_gt_masks_on_packed_batch_frozen():
    m = build_token_ce_weights(GT, PACKED_TYPES, TokenCEWeights(desc_ce_weight=0.5), segment_ids=PACKED_SEG)
    expected_struct = torch.tensor([
        [0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1],
        [0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    expected_desc = torch.tensor([
        [0, 0, 0, 0.5, 0, 0, 0, 0, 0, 0.5, 0.5, 0, 0, 0],
        [0, 0, 0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=torch.float32)
    torch.testing.assert_close(m.struct, expected_struct)
    torch.testing.assert_close(m.desc, expected_desc)


def test_self_context_masks():
    m = build_token_ce_weights(SELF_CONTEXT, PACKED_TYPES, TokenCEWeights(), segment_ids=PACKED_SEG)
    torch.testing.assert_close(m.struct, 0.1 * ((PACKED_TYPES == S) | (PACKED_TYPES == E)).float())
    assert m.desc.abs().sum() == 0
    assert not text_gate_positions(m)[PACKED_TYPES == E].any()


def test_supervised_first_token_of_segment_raises():
    tt = PACKED_TYPES.clone()
    tt[0, 7] = S  # first token of segment 1 would read logits of segment 0's last token
    with pytest.raises(ValueError, match="row 0, position 7 is the first token of its segment"):
        build_token_ce_weights(GT, tt, TokenCEWeights(), segment_ids=PACKED_SEG)
    tt = PACKED_TYPES.clone()
    tt[0, 0] = S
    with pytest.raises(ValueError, match="row 0, position 0"):
        build_token_ce_weights(GT, tt, TokenCEWeights(), segment_ids=PACKED_SEG)
