"""Data contracts shared by encoding, packing, rollout building and the loss pipeline.

Units: ``bins`` are integers in 0..999 (docs/DATA.md), pixels are floats in the
original image. Every per-token tensor is 1-D of length ``L`` (one sample) and
is indexed by token position (see ``core/vocab.py`` for the alignment
convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GTObject:
    """One ground-truth object: free-text ``desc`` and a box in bins ``[x1, y1, x2, y2]``."""

    desc: str
    bins: tuple[int, int, int, int]


@dataclass(frozen=True)
class Record:
    """One validated JSONL line (the record contract of docs/DATA.md), boxes already in bins.

    ``source`` is ``"file.jsonl:LINE"`` so every later error can point at it.
    """

    image_path: str
    width: int
    height: int
    objects: tuple[GTObject, ...]
    image_id: str
    source: str = ""


@dataclass(frozen=True)
class BBoxGroup:
    """Four coord tokens that form one box and what they are supervised towards.

    ``coord_pos`` are token positions (coord *input* positions) in the sample;
    the distributions are read at ``coord_pos - 1``. ``target_bins`` are the GT
    bins (for a matched rollout object: the matched GT box, not the prediction).
    ``subset`` is a ``core.vocab`` subset code (NO_SUBSET in gt context).
    """

    coord_pos: tuple[int, int, int, int]
    target_bins: tuple[int, int, int, int]
    subset: int = -1
    object_index: int = -1


@dataclass(frozen=True)
class ObjectSpan:
    """Token spans of one object inside an encoded answer (token positions in the sample).

    ``start``/``end``: ``[start, end)`` tokens overlapping the object's ``{...}``.
    ``desc_start``/``desc_end``: tokens overlapping the desc value characters.
    ``coord_pos``: the 4 coord token positions (fewer for an invalid rollout object).
    """

    index: int
    start: int
    end: int
    desc_start: int
    desc_end: int
    coord_pos: tuple[int, ...]
    desc: str
    bins: tuple[int, ...]


@dataclass
class RolloutMeta:
    """What a rollout-built sample records beyond its tensors (its ``EncodedSample.meta``; built by
    ``rollout.builder``): the facts the
    tensors cannot give back. Every position-level fact is derived from the tensors on demand by
    ``rollout.types.rollout_view``, never stored twice (docs/training/STAGE2_RUNBOOK.md).

    prefix_len:   kept generated tokens (``ParsedRollout.cut``); the tail starts at ``prompt_len + prefix_len``
    drop_reasons: count per drop reason (includes truncated)
    counters:     per-sample numbers: matched, fp, fn, valid_pred, gt, invalid_dropped, ... (rollout/* metrics)
    cut_suffix:   text appended to complete a fused token at the cut
    """

    prefix_len: int
    drop_reasons: dict[str, int]
    counters: dict[str, int]
    cut_suffix: str = ""


@dataclass
class EncodedSample:
    """One chat-encoded sample (prompt with image + answer), ready to pack.

    input_ids          [L] long
    token_types        [L] long: registry token type, IGNORE for prompt/image tokens
    object_index       [L] long: index of the object span a token overlaps most, -1 outside
    subset             [L] long: registry subset code (rollout context), NO_SUBSET elsewhere
    coord_targets      [L] long: target bin at coord positions that feed coord_reg, -1 elsewhere
    closure            [L] bool: the token holding the outermost ``}`` of the answer
    mm_token_type_ids  [L] long: 1 at ``<|image_pad|>``
    pixel_values       [P, D] float: flattened patches of this sample's image
    image_grid_thw     [1, 3] long
    prompt_len: number of prompt tokens (answer starts at this position)
    objects: spans of the answer objects in answer order
    bbox_groups: boxes that feed geometry / coord_reg (all GT objects in gt context)
    dropped_invalid: a rollout sample that kept at least one complete invalid object (dropped from
        the training text); token_ce multiplies its struct weights by the configured
        ``rollout_drop_invalid_struct_ce_multiplier``. Always False for GT samples.
    """

    input_ids: torch.Tensor
    token_types: torch.Tensor
    object_index: torch.Tensor
    subset: torch.Tensor
    coord_targets: torch.Tensor
    closure: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    prompt_len: int
    objects: list[ObjectSpan] = field(default_factory=list)
    bbox_groups: list[BBoxGroup] = field(default_factory=list)
    dropped_invalid: bool = False
    record: Record | None = None
    meta: RolloutMeta | None = None  # set for rollout-context samples (rollout.builder)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Segment:
    """Where one sample sits in a packed batch: row ``row``, tokens ``[start, start + length)``.

    sample_index: the sample's index in the sequence its rows were drawn from (the training set for
                  ``PackedDataset`` batches: the index of its record; the collated order otherwise)
    prompt_len:   the sample's prompt tokens (its answer starts at ``start + prompt_len``)
    image_rows:   its rows of ``PackedBatch.image_grid_thw`` (1 per image; 0 without an image)
    """

    row: int
    start: int
    length: int
    sample_index: int
    prompt_len: int = 0
    image_rows: int = 0


@dataclass
class PackedBatch:
    """Samples packed padding-free into ``B`` rows of ``T`` tokens (right-padded to the longest row).

    Per-token tensors are ``[B, T]`` with the same meaning as in ``EncodedSample``;
    ``segment_ids`` numbers segments within a row (-1 on padding) and
    ``text_position_ids`` restarts at 0 for every segment. Padding tokens have
    ``token_types == IGNORE``. ``pixel_values``/``image_grid_thw`` are concatenated
    in segment order (row-major), matching the order of image pads in ``input_ids``.
    ``bbox_groups`` carry *flat* positions into the ``[B, T]`` grid (``row * T + pos``).
    The batch holds tensors and positions only, no samples or records (what loader workers send
    back once): a Rollout step takes its records by ``Segment.sample_index`` from the training set
    and its prompts out of these tensors (``data.encoding.prompts_of``).
    """

    input_ids: torch.Tensor
    token_types: torch.Tensor
    object_index: torch.Tensor
    subset: torch.Tensor
    coord_targets: torch.Tensor
    closure: torch.Tensor
    dropped_invalid: torch.Tensor  # [B, T] bool: the owning sample's ``dropped_invalid`` (False on padding)
    mm_token_type_ids: torch.Tensor
    segment_ids: torch.Tensor
    text_position_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    segments: list[Segment]
    bbox_groups: list[BBoxGroup]
    # messages of the samples left out because their image failed to decode (data.skip_invalid)
    skipped: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return int(sum(s.length for s in self.segments))

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch with every tensor on ``device`` (a no-op copy-free return on the same device)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in self.__dict__.items()
        }
        return PackedBatch(**moved)
