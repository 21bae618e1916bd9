"""The one rollout sequence builder (Channel-B and Rollout-Aligned share it; docs/training/STAGE2_RUNBOOK.md).

Training sequence of a rollout::

    prompt ids
    + generated ids[:cut]                      (kept verbatim, never re-encoded)
    + tokens of  cut_suffix + ", "? + FN objects (GT order) + "]}"   (the tail, tokenised once)
    + <|im_end|>

``", "`` is added iff at least one object (valid or invalid) is kept and an FN object follows.
A rollout without a parsable container becomes ``prompt + tokens('{"objects": [' + all GT + ']}')
+ <|im_end|>`` (every GT object is FN), which is token-for-token the GT teacher-forcing answer.

Per-token annotations are decided on characters, then moved onto tokens: the answer text is
``text[:kept_end]`` of the rollout followed by the tail text; every character carries a token
type (rollout chars from the parser, tail chars from ``render_objects_fragment``) and the object
it belongs to (kept rollout objects, then FN objects). A token takes the type covering most of its
characters (``data.tokens.assign_token_types``) and the object it overlaps most (ties: the
earlier object); its subset is that object's (MATCHED, FP, FN) or NO_SUBSET outside objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.vocab import EOS, FN, FP, MATCHED, NO_SUBSET, STRUCT
from data.coordjson import (
    CONTAINER_CLOSE,
    CONTAINER_OPEN,
    OBJECT_SEP,
    RenderedAnswer,
    find_outermost_closure,
    render_objects_fragment,
)
from data.encoding import object_token_index, place_rendered_objects
from data.tokens import assign_token_types, char_span_to_tokens
from data.types import BBoxGroup, EncodedSample, GTObject, ObjectSpan, RolloutMeta
from rollout.parser import default_eos_id
from rollout.types import MatchResult, ParsedRollout


def _check_match(parsed: ParsedRollout, match: MatchResult, n_gt: int) -> None:
    """The match must be of this rollout's valid objects against these GT objects (a programming error otherwise)."""
    n_pred = len(parsed.valid_objects)
    ps = [i for i, _ in match.pairs]
    gs = [j for _, j in match.pairs]
    ok = (
        sorted(ps + list(match.fp)) == list(range(n_pred))
        and sorted(gs + list(match.fn)) == list(range(n_gt))
        and (match.num_pred in (0, n_pred))
        and (match.num_gt in (0, n_gt))
    )
    if not ok:
        raise ValueError(
            f"match does not partition {n_pred} valid predictions and {n_gt} GT objects (pairs={match.pairs}, "
            f"fp={match.fp}, fn={match.fn}); call hungarian_match(parsed.pred_bins, [o.bins for o in gt_objects])"
        )


@dataclass(frozen=True)
class _Answer:
    """The built answer text: the rollout's kept prefix, then the tail (cut suffix, separator, FN objects, ``]}``)."""

    text: str
    char_types: list[int]
    cut: int  # kept generated tokens
    kept_end: int  # characters of the kept prefix (where the tail starts)
    tail: str
    frag: RenderedAnswer  # the FN objects, rendered
    frag_base: int  # character where ``frag`` starts
    head: str  # the cut suffix (or the container opening when none was found)


def _answer(parsed: ParsedRollout, fn_objects: list[GTObject], kept: list) -> _Answer:
    if parsed.container_found:
        cut = parsed.cut
        kept_end = parsed.token_offsets[cut - 1][1] if cut > 0 else 0
        head, head_types = parsed.cut_suffix, list(parsed.char_types[kept_end : parsed.cut_char])
    else:
        cut, kept_end, head = 0, 0, CONTAINER_OPEN
        head_types = [STRUCT] * len(head)
    sep = OBJECT_SEP if (kept and fn_objects) else ""
    frag = render_objects_fragment(fn_objects)
    tail = head + sep + frag.text + CONTAINER_CLOSE
    char_types = (list(parsed.char_types[:kept_end]) + head_types + [STRUCT] * len(sep) + list(frag.char_types)
                  + [STRUCT] * len(CONTAINER_CLOSE))
    return _Answer(parsed.text[:kept_end] + tail, char_types, cut, kept_end, tail, frag,
                   kept_end + len(head) + len(sep), head)


def _closure(answer: str, parsed: ParsedRollout, offsets, n_ans: int) -> tuple[list[bool], bool]:
    """The closure flag per answer token, and whether the string-aware scan disagreed. The container's own
    `}` is the last answer character by construction; the scan agrees because the parser delimits objects
    with the same rules (docs/ROLLOUT.md)."""
    closure_char = find_outermost_closure(answer, parsed.container_start if parsed.container_found else 0)
    mismatch = closure_char != len(answer) - 1
    c0, _ = char_span_to_tokens(offsets, len(answer) - 1, len(answer))
    closure = [False] * n_ans
    closure[c0] = True
    return closure, mismatch


def _counters(parsed: ParsedRollout, match: MatchResult, n_gt: int, mismatch: bool) -> dict[str, int]:
    """The per-sample rollout counters (summed into the rollout/* metrics)."""
    counters = {
        "matched": len(match.pairs),
        "fp": len(match.fp),
        "fn": len(match.fn),
        "fn_appended": len(match.fn),
        "valid_pred": len(parsed.valid_objects),
        "gt": n_gt,
        "invalid_dropped": parsed.n_invalid_dropped if parsed.container_found else 0,
        "container_found": int(parsed.container_found),
        "closed": int(parsed.closed),
        "eos_found": int(parsed.eos_found),
        "parse_valid": int(parsed.parse_valid),
    }
    if mismatch:
        counters["closure_scan_mismatch"] = 1
    return counters


def build_rollout_sample(
    prompt: EncodedSample,
    gen_ids: Sequence[int],
    parsed: ParsedRollout,
    match: MatchResult,
    gt_objects: Sequence[GTObject],
    tokenizer,
    coord_vocab,
    *,
    im_end_id: int | None = None,
) -> EncodedSample:
    """Teacher-forced rollout sample with token types, subsets, closure, coord targets, bbox groups and meta.

    prompt:      ``ChatEncoder.encode_prompt(record)`` (ends with the assistant header)
    gen_ids:     the generated ids that ``parsed`` was parsed from
    match:       ``hungarian_match(parsed.pred_bins, [o.bins for o in gt_objects])``
    gt_objects:  GT objects in GT (answer) order; FN objects are appended in this order
    Returns an ``EncodedSample`` whose ``meta`` is a ``RolloutMeta`` (``rollout.types.rollout_view`` derives the
    rich meta from its tensors); tensors are 1-D ``[L]``.
    """
    gen = tuple(int(t) for t in gen_ids)
    if gen != parsed.token_ids:
        raise ValueError("gen_ids differ from the ids `parsed` was parsed from; pass the same generated ids")
    gt = list(gt_objects)
    _check_match(parsed, match, len(gt))
    P = prompt.prompt_len
    if len(prompt) != P:
        raise ValueError(f"prompt sample has {len(prompt)} tokens but prompt_len={P}; pass encode_prompt(record)")
    eos_id = default_eos_id(tokenizer) if im_end_id is None else int(im_end_id)
    kept = parsed.kept_objects if parsed.container_found else []
    valid_index = {o.index: i for i, o in enumerate(parsed.valid_objects)}
    gt_of_pred = match.gt_of_pred
    fn = sorted(match.fn)
    ans = _answer(parsed, [gt[j] for j in fn], kept)

    # Objects in built order, by character span: kept rollout objects (matched or FP), then FN objects.
    subsets = [MATCHED if o.valid and valid_index[o.index] in gt_of_pred else FP for o in kept] + [FN] * len(fn)
    spans = [(o.char_start, o.char_end) for o in kept] + [
        (ans.frag_base + s, ans.frag_base + e) for s, e in ans.frag.object_char_spans]

    # Tokens: the kept generated ids verbatim, then the tail tokenised once, then <|im_end|>.
    enc = tokenizer(ans.tail, add_special_tokens=False, return_offsets_mapping=True)
    offsets = list(parsed.token_offsets[:ans.cut]) + [(ans.kept_end + int(s), ans.kept_end + int(e))
                                                      for s, e in enc["offset_mapping"]]
    ans_ids = list(gen[:ans.cut]) + [int(t) for t in enc["input_ids"]] + [eos_id]
    n_ans = len(ans_ids)
    types = assign_token_types(offsets, ans.char_types) + [EOS]
    obj_index, tok_spans = object_token_index(offsets, spans)  # the GT encoder's rule
    obj_index.append(-1)  # <|im_end|>
    subset = [subsets[k] if k >= 0 else NO_SUBSET for k in obj_index]

    coord_targets = [-1] * n_ans
    objects: list[ObjectSpan] = []
    groups_prefix: list[BBoxGroup] = []
    for k, o in enumerate(kept):
        t0, t1 = tok_spans[k]
        d0, d1 = char_span_to_tokens(offsets, *o.desc_char_span) if o.desc_char_span is not None else (t0, t0)
        pos = tuple(P + t for t in o.coord_pos)
        objects.append(ObjectSpan(k, P + t0, P + t1, P + d0, P + d1, pos, o.desc or "", tuple(o.bins)))
        if subsets[k] == MATCHED:
            target = tuple(gt[gt_of_pred[valid_index[o.index]]].bins)
            for t, b in zip(o.coord_pos, target, strict=True):
                coord_targets[t] = int(b)
            groups_prefix.append(BBoxGroup(pos, target, MATCHED, k))  # type: ignore[arg-type]
    # FN objects: the same span/target placement as a GT answer (data.encoding), at the tail.
    fn_objects, groups_fn = place_rendered_objects(
        ans.frag, [gt[j] for j in fn], offsets, tok_spans, coord_targets,
        prompt_len=P, char_base=ans.frag_base, first_index=len(kept), subset=FN,
    )
    closure, mismatch = _closure(ans.text, parsed, offsets, n_ans)
    counters = _counters(parsed, match, len(gt), mismatch)

    def tail(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype)

    return EncodedSample(
        input_ids=torch.cat([prompt.input_ids, tail(ans_ids)]),
        token_types=torch.cat([prompt.token_types, tail(types)]),
        object_index=torch.cat([prompt.object_index, tail(obj_index)]),
        subset=torch.cat([prompt.subset, tail(subset)]),
        coord_targets=torch.cat([prompt.coord_targets, tail(coord_targets)]),
        closure=torch.cat([prompt.closure, tail(closure, torch.bool)]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(n_ans, dtype=torch.long)]),
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
        prompt_len=P,
        objects=objects + fn_objects,
        bbox_groups=groups_prefix + groups_fn,
        dropped_invalid=counters["invalid_dropped"] > 0,
        record=prompt.record,
        meta=RolloutMeta(prefix_len=ans.cut, drop_reasons=parsed.drop_reasons, counters=counters,
                         cut_suffix=ans.head if parsed.container_found else ""),
    )


__all__ = ["build_rollout_sample"]
