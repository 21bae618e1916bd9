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

import torch

from core.vocab import EOS, FN, FP, MATCHED, NO_SUBSET, STRUCT
from data.coordjson import CONTAINER_CLOSE, CONTAINER_OPEN, OBJECT_SEP, find_outermost_closure, render_objects_fragment
from data.encoding import object_token_index, place_rendered_objects
from data.tokens import assign_token_types, char_span_to_tokens
from data.types import BBoxGroup, EncodedSample, GTObject, ObjectSpan
from rollout.parser import default_eos_id
from rollout.types import MatchResult, ParsedRollout, RolloutMeta


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
    eos_id = default_eos_id(tokenizer) if im_end_id is None else int(im_end_id)

    # ---------------------------------------------------------------- text
    kept = parsed.kept_objects if parsed.container_found else []
    valid_index = {o.index: i for i, o in enumerate(parsed.valid_objects)}
    gt_of_pred = match.gt_of_pred
    fn = sorted(match.fn)
    if parsed.container_found:
        cut = parsed.cut
        kept_end = parsed.token_offsets[cut - 1][1] if cut > 0 else 0
        prefix_text = parsed.text[:kept_end]
        head = parsed.cut_suffix
        head_types = list(parsed.char_types[kept_end : parsed.cut_char])
    else:
        cut, kept_end, prefix_text = 0, 0, ""
        head = CONTAINER_OPEN
        head_types = [STRUCT] * len(head)
    sep = OBJECT_SEP if (kept and fn) else ""
    frag = render_objects_fragment([gt[j] for j in fn])
    tail_text = head + sep + frag.text + CONTAINER_CLOSE
    answer = prefix_text + tail_text
    char_types = (
        list(parsed.char_types[:kept_end]) + head_types + [STRUCT] * len(sep) + list(frag.char_types)
        + [STRUCT] * len(CONTAINER_CLOSE)
    )
    frag_base = kept_end + len(head) + len(sep)

    # Objects in built order: kept rollout objects, then FN objects. (char span, subset, ...)
    spans: list[tuple[int, int]] = []
    subsets: list[int] = []
    for o in kept:
        spans.append((o.char_start, o.char_end))
        matched = o.valid and valid_index[o.index] in gt_of_pred
        subsets.append(MATCHED if matched else FP)
    for s, e in frag.object_char_spans:
        spans.append((frag_base + s, frag_base + e))
        subsets.append(FN)

    # ---------------------------------------------------------------- tokens
    enc = tokenizer(tail_text, add_special_tokens=False, return_offsets_mapping=True)
    tail_ids = [int(t) for t in enc["input_ids"]]
    tail_off = [(kept_end + int(s), kept_end + int(e)) for s, e in enc["offset_mapping"]]
    offsets = list(parsed.token_offsets[:cut]) + tail_off
    ans_ids = list(gen[:cut]) + tail_ids
    n_ans = len(ans_ids) + 1  # + <|im_end|>
    types = assign_token_types(offsets, char_types) + [EOS]

    obj_index, tok_spans = object_token_index(offsets, spans)  # the GT encoder's rule
    obj_index.append(-1)  # <|im_end|>
    subset = [subsets[k] if k >= 0 else NO_SUBSET for k in obj_index]

    P = prompt.prompt_len
    if len(prompt) != P:
        raise ValueError(f"prompt sample has {len(prompt)} tokens but prompt_len={P}; pass encode_prompt(record)")
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
        frag, [gt[j] for j in fn], offsets, tok_spans, coord_targets,
        prompt_len=P, char_base=frag_base, first_index=len(kept), subset=FN,
    )
    objects.extend(fn_objects)

    # The container's own `}` is the last answer character by construction; the string-aware scan
    # agrees because the parser delimits objects with the same rules (docs/ROLLOUT.md).
    closure_char = find_outermost_closure(answer, parsed.container_start if parsed.container_found else 0)
    counters_extra = {}
    if closure_char != len(answer) - 1:
        counters_extra["closure_scan_mismatch"] = 1
        closure_char = len(answer) - 1
    c0, c1 = char_span_to_tokens(offsets, closure_char, closure_char + 1)
    closure = [False] * n_ans
    closure[c0] = True

    # ---------------------------------------------------------------- tensors
    ids = torch.cat([prompt.input_ids, torch.tensor(ans_ids + [eos_id], dtype=torch.long)])
    token_types = torch.cat([prompt.token_types, torch.tensor(types, dtype=torch.long)])
    n_invalid = parsed.n_invalid_dropped if parsed.container_found else 0
    n_matched = len(match.pairs)
    counters = {
        "matched": n_matched,
        "fp": len(match.fp),
        "fn": len(fn),
        "fn_appended": len(fn),
        "valid_pred": len(parsed.valid_objects),
        "gt": len(gt),
        "invalid_dropped": n_invalid,
        "container_found": int(parsed.container_found),
        "closed": int(parsed.closed),
        "eos_found": int(parsed.eos_found),
        "parse_valid": int(parsed.parse_valid),
        **counters_extra,
    }
    meta = RolloutMeta(prefix_len=cut, drop_reasons=parsed.drop_reasons, counters=counters,
                       cut_suffix=head if parsed.container_found else "")
    return EncodedSample(
        input_ids=ids,
        token_types=token_types,
        object_index=torch.cat([prompt.object_index, torch.tensor(obj_index, dtype=torch.long)]),
        subset=torch.cat([prompt.subset, torch.tensor(subset, dtype=torch.long)]),
        coord_targets=torch.cat([prompt.coord_targets, torch.tensor(coord_targets, dtype=torch.long)]),
        closure=torch.cat([prompt.closure, torch.tensor(closure, dtype=torch.bool)]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros(n_ans, dtype=torch.long)]),
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
        prompt_len=P,
        objects=objects,
        bbox_groups=groups_prefix + groups_fn,
        dropped_invalid=n_invalid > 0,
        record=prompt.record,
        meta=meta,
    )


__all__ = ["build_rollout_sample"]
