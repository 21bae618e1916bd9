"""Rollout machinery: generate -> salvage-parse -> Hungarian match -> build the teacher-forced sequence -> pack.

See docs/ROLLOUT.md. Import from the submodules (``rollout.parser``, ``rollout.matching``,
``rollout.builder``, ``rollout.packing``, ``rollout.backends``, ``rollout.metrics``); the most used
names are re-exported here.
"""

from data.types import RolloutMeta  # the sample's meta (a data contract), re-exported for callers
from rollout.backends import GenerationBackend, HFGenerationBackend
from rollout.builder import build_rollout_sample
from rollout.matching import hungarian_match, iou_matrix
from rollout.metrics import rollout_counters
from rollout.packing import pack_rollout_samples
from rollout.parser import parse_rollout, token_pieces
from rollout.types import (
    DROP_REASONS,
    STOP_REASONS,
    GenerationOutput,
    MatchResult,
    ParsedObject,
    ParsedRollout,
    RolloutView,
    rollout_view,
)

__all__ = [
    "DROP_REASONS",
    "STOP_REASONS",
    "GenerationBackend",
    "GenerationOutput",
    "HFGenerationBackend",
    "MatchResult",
    "ParsedObject",
    "ParsedRollout",
    "RolloutMeta",
    "RolloutView",
    "rollout_view",
    "build_rollout_sample",
    "hungarian_match",
    "iou_matrix",
    "pack_rollout_samples",
    "parse_rollout",
    "rollout_counters",
    "token_pieces",
]
