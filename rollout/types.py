"""Rollout contracts: what the parser, the matcher, the sequence builder and the backends hand each other.

Units: ``bins`` are integers 0..999 (docs/DATA.md). Token indices in ``ParsedObject``/``ParsedRollout``
index the *generated* ids (position 0 = first generated token); positions in ``RolloutView``
(and ``data.types.RolloutMeta``) index the *built* training sample (prompt + kept prefix + tail), like ``data.types.ObjectSpan``.
Character offsets index ``ParsedRollout.text`` (the decoded generated text before ``<|im_end|>``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from core.vocab import DESC, FN, FP, MATCHED, STRUCT
from data.types import BBoxGroup, EncodedSample, RolloutMeta

# Why an object of a rollout is not a valid prediction (``ParsedObject.drop_reason``). Metric keys
# are ``rollout/drop_<reason>_count``. Precedence when several apply: the first in this tuple.
DROP_REASONS: tuple[str, ...] = (
    "truncated",  # the generation ended inside the object (not kept in the prefix)
    "bad_json",  # the object's inside is not `"key": value` pairs, or a string has a bad escape
    "unexpected_keys",  # a key other than desc / bbox_2d, or a key given twice
    "key_order",  # bbox_2d written before desc (the contract is exactly desc, then bbox_2d)
    "missing_desc",  # no desc key, desc not a string, or an empty / whitespace-only desc
    "coord_in_desc",  # a coord token inside the desc string
    "missing_bbox",  # no bbox_2d key, or bbox_2d is not a list
    "non_coord_token",  # a bbox element that is not one genuine coord token (numbers, spelled-out text)
    "wrong_arity",  # bbox_2d has != 4 coord tokens
    "bbox_invalid",  # x2 < x1 or y2 < y1 (bins)
)

# Why the salvage scan stopped (``ParsedRollout.stop_reason``).
STOP_REASONS: tuple[str, ...] = (
    "closed",  # the container closed with `]}` (anything after it is ignored trailing text)
    "no_container",  # the text does not start with `{"objects": [`
    "end_of_text",  # the generation ended before the container closed (truncated)
    "bad_element",  # an array element that is not an object `{...}`
    "bad_separator",  # after an object: neither `,` nor `]`
    "bad_container_close",  # `]` closing the array is not followed by `}`
)


@dataclass(frozen=True)
class ParsedObject:
    """One object found in a rollout (valid or not).

    index:           order in the rollout (0-based, counting every object the scan met)
    token_start/end: ``[start, end)`` generated tokens overlapping the object's ``{...}`` characters
    char_start/end:  ``[start, end)`` characters of the ``{...}`` in ``ParsedRollout.text``
    desc:            decoded desc string (None when missing or undecodable)
    desc_char_span / desc_token_span: the desc value between its quotes (escaped form), ``[start, end)``
    coord_pos:       generated-token indices of the genuine coord tokens of ``bbox_2d``, in order
    bins:            their bins (same length as ``coord_pos``)
    valid:           desc present + exactly 4 coord tokens + x1<=x2, y1<=y2 + no other keys
    drop_reason:     one of ``DROP_REASONS`` when not valid, else None
    kept:            the object lies inside the kept prefix (every complete object; never a truncated one)
    """

    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    desc: str | None
    desc_char_span: tuple[int, int] | None
    desc_token_span: tuple[int, int] | None
    coord_pos: tuple[int, ...]
    bins: tuple[int, ...]
    valid: bool
    drop_reason: str | None
    kept: bool


@dataclass
class ParsedRollout:
    """Salvage-parse of one generated sequence (see ``rollout.parser.parse_rollout``).

    token_ids:        the generated ids as given (nothing stripped)
    text:             decoded text of the tokens before the first eos
    token_offsets:    ``(start, end)`` char span in ``text`` of each token before the eos
                      (``len == n_text_tokens``); a multi-byte character split over byte-level
                      tokens belongs to the token that completes it
    char_types:       registry token type per char of ``text``: COORD on genuine coord tokens, DESC
                      inside the desc strings of complete objects, IGNORE on a preamble before the
                      container, STRUCT elsewhere
    container_found:  ``{"objects": [`` was found (at the start, or after a preamble)
    container_start:  char offset of the container's ``{``; > 0 when other text (a preamble such as
                      ``Answer: ``) came first: the first container is salvaged, the preamble is kept
                      in the prefix as untrained context (IGNORE)
    closed:           the container closed with ``]}``
    eos_found / eos_pos: whether / where (token index) the eos token was generated
    objects:          every object the scan met, in order
    cut:              kept generated tokens ``[0, cut)``: whole tokens ending at or before ``cut_char``
    cut_char:         the append point in ``text``: right after ``[`` or after the last complete object
    cut_suffix:       ``text[token_offsets[cut-1][1]:cut_char]``, the characters of a fused token
                      that straddles the append point; the builder tokenises and appends them
    stop_reason:      one of ``STOP_REASONS``
    trailing_text:    characters after the stop point that were ignored
    """

    token_ids: tuple[int, ...]
    text: str
    token_offsets: list[tuple[int, int]]
    char_types: list[int]
    container_found: bool
    closed: bool
    eos_found: bool
    eos_pos: int | None
    objects: list[ParsedObject]
    cut: int
    cut_char: int
    cut_suffix: str
    stop_reason: str
    trailing_text: str = ""
    container_start: int = 0

    @property
    def has_preamble(self) -> bool:
        """The container was found after other text (``container_start > 0``)."""
        return self.container_found and self.container_start > 0

    @property
    def n_text_tokens(self) -> int:
        return len(self.token_offsets)

    @property
    def valid_objects(self) -> list[ParsedObject]:
        """The predictions that are matched against GT (``hungarian_match`` pred index i = this list's i)."""
        return [o for o in self.objects if o.valid]

    @property
    def kept_objects(self) -> list[ParsedObject]:
        """Objects inside the kept prefix, valid or not (invalid ones become FP spans)."""
        return [o for o in self.objects if o.kept]

    @property
    def pred_bins(self) -> list[tuple[int, int, int, int]]:
        """``[P][4]`` bins of the valid objects, the ``pred_bins`` argument of ``hungarian_match``."""
        return [tuple(o.bins) for o in self.valid_objects]  # type: ignore[misc]

    @property
    def drop_reasons(self) -> dict[str, int]:
        """Count of objects per drop reason (only reasons that occurred)."""
        return dict(Counter(o.drop_reason for o in self.objects if o.drop_reason is not None))

    @property
    def n_invalid_dropped(self) -> int:
        """Complete but invalid objects (kept as FP spans). Truncated objects are not counted here:
        running out of ``max_new_tokens`` is not a malformed object (see docs/ROLLOUT.md)."""
        return sum(1 for o in self.objects if o.kept and not o.valid)

    @property
    def parse_valid(self) -> bool:
        """Container found at the start (no preamble) and closed, no object dropped for any reason."""
        return self.container_found and not self.has_preamble and self.closed and all(o.valid for o in self.objects)


@dataclass(frozen=True)
class MatchResult:
    """Hungarian matching of P valid predictions against G GT boxes.

    pairs: ``(pred_idx, gt_idx)`` sorted by pred_idx; pred_idx indexes ``ParsedRollout.valid_objects``
    fp:    unmatched prediction indices (ascending); fn: unmatched GT indices (ascending)
    ious:  IoU (bin space) of each pair, same order as ``pairs``
    """

    pairs: list[tuple[int, int]]
    fp: list[int]
    fn: list[int]
    ious: list[float]
    num_pred: int = 0
    num_gt: int = 0
    desc_gate_rejected: int = 0  # pairs above the IoU gate refused by the desc gate (0 when the gate is off)

    @property
    def gt_of_pred(self) -> dict[int, int]:
        return dict(self.pairs)


@dataclass(frozen=True)
class RolloutView:
    """The rich per-sample meta of a rollout-built sample, derived from its tensors (:func:`rollout_view`);
    positions index the built sample.

    prefix_struct_pos:   supervised struct tokens of the kept prefix (not in FP spans)
    tail_desc_pos:       desc tokens of the tail (FN objects)
    tail_closure_pos:    the token holding the outermost ``}``; eos_pos: ``<|im_end|>``
    bbox_groups_prefix:  matched prefix objects (4 coord positions + matched GT bins); bbox_groups_fn: FN objects
    prefix_coord_pos / prefix_coord_target_bins: coord positions of matched prefix objects, flattened, and
                         their GT bins (FP coord positions feed nothing)
    fp_spans:            ``[start, end)`` of FP objects (unmatched valid + invalid) in the prefix
    """

    prompt_len: int
    prefix_len: int
    train_len: int
    prefix_struct_pos: list[int]
    tail_desc_pos: list[int]
    tail_closure_pos: int
    eos_pos: int
    bbox_groups_prefix: list[BBoxGroup]
    bbox_groups_fn: list[BBoxGroup]
    prefix_coord_pos: list[int]
    prefix_coord_target_bins: list[int]
    fp_spans: list[tuple[int, int]]
    n_dropped_invalid: int
    drop_reasons: dict[str, int]
    counters: dict[str, int]
    cut_suffix: str


def rollout_view(sample: EncodedSample) -> RolloutView:
    """The :class:`RolloutView` of a rollout-built ``EncodedSample`` (its ``meta`` a :class:`RolloutMeta`)."""
    meta: RolloutMeta = sample.meta  # type: ignore[assignment]  (set on every rollout-built sample)
    P, L = int(sample.prompt_len), int(sample.input_ids.shape[0])
    tail = P + meta.prefix_len
    types, subset = sample.token_types.tolist(), sample.subset.tolist()
    object_index = sample.object_index.tolist()
    prefix = [g for g in sample.bbox_groups if g.subset == MATCHED]
    subset_of = {k: subset[j] for j, k in reversed(list(enumerate(object_index))) if k >= 0}
    return RolloutView(
        prompt_len=P,
        prefix_len=meta.prefix_len,
        train_len=L,
        prefix_struct_pos=[p for p in range(P, tail) if types[p] == STRUCT and subset[p] != FP],
        tail_desc_pos=[p for p in range(tail, L) if types[p] == DESC],
        tail_closure_pos=int(sample.closure.nonzero()[0, 0]),
        eos_pos=L - 1,
        bbox_groups_prefix=prefix,
        bbox_groups_fn=[g for g in sample.bbox_groups if g.subset == FN],
        prefix_coord_pos=[p for g in prefix for p in g.coord_pos],
        prefix_coord_target_bins=[b for g in prefix for b in g.target_bins],
        fp_spans=[(o.start, o.end) for o in sample.objects if subset_of.get(o.index) == FP],
        n_dropped_invalid=int(meta.counters.get("invalid_dropped", 0)),
        drop_reasons=meta.drop_reasons,
        counters=meta.counters,
        cut_suffix=meta.cut_suffix,
    )


@dataclass
class GenerationOutput:
    """One generated continuation.

    token_ids:      generated ids, ending with the eos when it was produced (no padding)
    token_logprobs: log-probability (natural log, temperature/top-k/top-p NOT applied: the model's own
                    distribution) of each chosen token, ``len == len(token_ids)``
    finished:       the eos was produced before ``max_new_tokens``
    """

    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)
    finished: bool = False
