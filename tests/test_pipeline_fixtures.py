"""Hand-built packed batches and contexts for the pipeline tests (no model, no tokenizer).

Vocabulary: 50 text ids (0..49) then the 1000 coord ids (50..1049), ``V = 1050``; ``H = 8``.
Rows are lists of token tuples ``(type, subset, coord_target, closure)``; input ids are drawn
from a generator seeded by the row index, coord tokens get ``50 + bin``.
"""

from __future__ import annotations

import torch

from core.vocab import COORD, DESC, EOS, FN, FP, IGNORE, MATCHED, NO_SUBSET, STRUCT
from data.types import BBoxGroup, PackedBatch, Segment

V_TEXT = 50
COORD_IDS = torch.arange(V_TEXT, V_TEXT + 1000)
V = V_TEXT + 1000
H = 8

PROMPT = (IGNORE, NO_SUBSET, -1, False)
EOS_TOK = (EOS, NO_SUBSET, -1, False)


def s(sub=NO_SUBSET):
    return (STRUCT, sub, -1, False)


def d(sub=NO_SUBSET):
    return (DESC, sub, -1, False)


def c(b, sub=NO_SUBSET, target=True):
    return (COORD, sub, b if target else -1, False, b)


def gt_row(boxes):
    """Prompt, ``{"objects": [``, per box ``{"desc": "`` d d ``", "bbox_2d": [`` 4 coords ``]}``, ``]}``, eos."""
    toks = [PROMPT, PROMPT, PROMPT, s()]
    groups = []
    for k, box in enumerate(boxes):
        if k:
            toks.append(s())
        toks += [s(), d(), d(), s()]
        start = len(toks)
        toks += [c(b) for b in box]
        groups.append((tuple(range(start, start + 4)), tuple(box), NO_SUBSET))
        toks.append(s())
    toks += [(STRUCT, NO_SUBSET, -1, True), EOS_TOK]
    return toks, groups


def rollout_row(matched, fp, fn):
    """Container opening, matched objects (prefix), FP objects (prefix), ``, `` and FN objects, closure, eos.

    matched: list of (pred_bins, gt_bins): coord tokens show the prediction, targets the GT box.
    """
    toks = [PROMPT, PROMPT, PROMPT, s()]
    groups = []

    def obj(sub, shown, target):
        if len(toks) > 4:
            toks.append(s())
        toks.extend([s(sub), d(sub), d(sub), s(sub)])
        start = len(toks)
        toks.extend(c(shown[i], sub, target is not None) if target is None else
                    (COORD, sub, target[i], False, shown[i]) for i in range(4))
        groups.append((tuple(range(start, start + 4)), tuple(target or shown), sub))
        toks.append(s(sub))

    for pred, gt in matched:
        obj(MATCHED, pred, gt)
    for pred in fp:
        obj(FP, pred, None)
    for gt in fn:
        obj(FN, gt, gt)
    toks += [(STRUCT, NO_SUBSET, -1, True), EOS_TOK]
    return toks, groups


def make_batch(rows, dropped_invalid=None) -> PackedBatch:
    """rows: list of (tokens, groups) from gt_row / rollout_row; one segment per row."""
    B = len(rows)
    T = max(len(t) for t, _ in rows)
    f = dict(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        token_types=torch.full((B, T), IGNORE),
        object_index=torch.full((B, T), -1),
        subset=torch.full((B, T), NO_SUBSET),
        coord_targets=torch.full((B, T), -1),
        closure=torch.zeros(B, T, dtype=torch.bool),
        dropped_invalid=torch.zeros(B, T, dtype=torch.bool),
        mm_token_type_ids=torch.zeros(B, T, dtype=torch.long),
        segment_ids=torch.full((B, T), -1),
        text_position_ids=torch.full((B, T), -1),
    )
    groups, segments = [], []
    for r, (toks, grps) in enumerate(rows):
        g = torch.Generator().manual_seed(1000 + r)
        n = len(toks)
        f["input_ids"][r, :n] = torch.randint(0, V_TEXT, (n,), generator=g)
        for j, tok in enumerate(toks):
            f["token_types"][r, j] = tok[0]
            f["subset"][r, j] = tok[1]
            f["coord_targets"][r, j] = tok[2]
            f["closure"][r, j] = tok[3]
            if tok[0] == COORD:
                f["input_ids"][r, j] = V_TEXT + tok[4]
        f["segment_ids"][r, :n] = 0
        f["text_position_ids"][r, :n] = torch.arange(n)
        f["dropped_invalid"][r, :n] = False if dropped_invalid is None else dropped_invalid[r]
        segments.append(Segment(row=r, start=0, length=n, sample_index=r))
        for pos, bins, sub in grps:
            groups.append(BBoxGroup(tuple(r * T + p for p in pos), bins, sub))
    return PackedBatch(
        **f,
        pixel_values=torch.zeros(0),
        image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
        segments=segments,
        bbox_groups=groups,
    )


def duplicate_batch(batch: PackedBatch) -> PackedBatch:
    """The same rows twice (``[2B, T]``); bbox group flat positions remapped to the copies."""
    B, T = batch.input_ids.shape
    per_token = ("input_ids", "token_types", "object_index", "subset", "coord_targets", "closure",
                 "dropped_invalid", "mm_token_type_ids", "segment_ids", "text_position_ids")
    f = {k: torch.cat([getattr(batch, k)] * 2) for k in per_token}
    groups = list(batch.bbox_groups) + [
        BBoxGroup(tuple(p + B * T for p in g.coord_pos), g.target_bins, g.subset, g.object_index) for g in batch.bbox_groups
    ]
    segments = list(batch.segments) + [Segment(sg.row + B, sg.start, sg.length, sg.sample_index + B) for sg in batch.segments]
    return PackedBatch(**f, pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                       segments=segments, bbox_groups=groups)


def random_hidden(batch: PackedBatch, seed: int) -> torch.Tensor:
    B, T = batch.input_ids.shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, generator=g).requires_grad_(True)


def lm_head(seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, H, generator=g) * 0.7).requires_grad_(True)


# Standard rows: Stage-1 / Channel-A (two rows, 2 + 1 boxes) and rollout (matched, FP, FN).
GT_ROWS = [gt_row([(100, 200, 400, 500), (10, 20, 900, 950)]), gt_row([(500, 500, 510, 700)])]
ROLLOUT_ROWS = [
    rollout_row(matched=[((110, 190, 420, 480), (100, 200, 400, 500))], fp=[(5, 5, 50, 60)], fn=[(600, 600, 800, 900)]),
    rollout_row(matched=[], fp=[], fn=[(300, 100, 350, 400)]),
]
