"""TeacherForcingContext: one micro-step's hidden states plus derived, cached views for modules.

Modules never read raw rollout meta or recompute LM-head projections: they ask the context for
coord positions/targets, coord logits per context (computed once, shared by ``bbox_geo``,
``coord_reg`` and ``coord_diag``), full-vocabulary logsumexp where gates need it, bbox groups,
and token-CE masks per context.

Which contexts are present tells the mode:

    {"gt"}                    Stage-1 (gt only)
    {"gt", "self_context"}    Channel-A (both over the same batch tokens)
    {"rollout"}               Channel-B / Rollout-Aligned

Positions are *flat token positions* ``row * T + pos`` of the ``[B, T]`` grid (the token as it
sits in ``input_ids``); the logits that predict a token are read at ``pos - 1``
(``losses.ce.hidden_at_logit_pos``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from configs.modules import TokenCEWeights
from core.vocab import CHANNELS, CONTEXTS, FN, GT, MATCHED, NUM_COORD_BINS, ROLLOUT, SELF_CONTEXT
from data.types import PackedBatch
from losses.ce import coord_logits as project_coord_logits
from losses.ce import full_logsumexp, hidden_at_logit_pos, text_and_full_logsumexp
from losses.checks import content_checks
from losses.masks import TokenCEMasks, build_token_ce_weights

MODE_GT = "gt"
MODE_CHANNEL_A = "channel_a"
MODE_ROLLOUT = "rollout"
_VALID_CONTEXT_SETS = {
    frozenset({GT}): MODE_GT,
    frozenset({GT, SELF_CONTEXT}): MODE_CHANNEL_A,
    frozenset({ROLLOUT}): MODE_ROLLOUT,
}


class PipelineError(ValueError):
    """An objective module cannot run on this context (missing prerequisite). Names the module."""


@dataclass
class CoordTargets:
    """Coord positions that feed ``geo`` / ``coord_reg`` (``batch.coord_targets >= 0``).

    pos   [N] long flat token positions (coord *input* positions)
    bins  [N] long target bins 0..999
    """

    pos: torch.Tensor
    bins: torch.Tensor


@dataclass
class BBoxView:
    """Boxes of ``batch.bbox_groups`` selected by subset, as tensors.

    pos     [G, 4] long flat coord positions (x1, y1, x2, y2 order)
    bins    [G, 4] long target bins
    subset  [G] long registry subset codes
    index   [G, 4] long row index of each position into :class:`CoordTargets` (and thus into
            :meth:`TeacherForcingContext.coord_logits`)
    """

    pos: torch.Tensor
    bins: torch.Tensor
    subset: torch.Tensor
    index: torch.Tensor

    @property
    def num_boxes(self) -> int:
        return int(self.pos.shape[0])


@dataclass
class TeacherForcingContext:
    """Inputs of one pipeline run (one micro-step, one channel).

    channel          "A" or "B" (Stage-2 Two-Channel: modules are scoped by it) or None
                     (Stage-1 and Rollout-Aligned: every enabled module runs)
    batch            the packed batch the forwards ran on (``[B, T]`` tensors)
    hidden           context name -> final hidden states ``[B, T, H]``
    lm_head_weight   ``[V, H]`` LM-head rows (coord rows included)
    coord_token_ids  ``[1000]`` long ids of ``<|coord_0|>..<|coord_999|>``, ordered by bin
    coord_decode_mode  "exp" | "st": geometry decode (``*.coord_decode_mode``)
    chunk_size       rows per LM-head projection chunk in full-vocabulary terms
    """

    channel: str | None
    batch: PackedBatch
    hidden: dict[str, torch.Tensor]
    lm_head_weight: torch.Tensor
    coord_token_ids: torch.Tensor
    coord_decode_mode: str = "exp"
    chunk_size: int = 2048
    _cache: dict[Hashable, tuple[Any, bool]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.channel is not None and self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)} or None, got {self.channel!r}")
        unknown = sorted(set(self.hidden) - set(CONTEXTS))
        if unknown:
            raise ValueError(f"unknown context(s) {unknown} in hidden; known: {', '.join(CONTEXTS)}")
        if frozenset(self.hidden) not in _VALID_CONTEXT_SETS:
            raise ValueError(
                f"hidden holds contexts {sorted(self.hidden)}; expected one of {{gt}} (Stage-1), "
                "{gt, self_context} (Channel-A) or {rollout} (Channel-B / Rollout-Aligned)"
            )
        B, T = self.batch.input_ids.shape
        for name, h in self.hidden.items():
            if h.dim() != 3 or tuple(h.shape[:2]) != (B, T):
                raise ValueError(f"hidden[{name!r}] must be [B={B}, T={T}, H], got {tuple(h.shape)}")
            if h.shape[-1] != self.lm_head_weight.shape[-1]:
                raise ValueError(f"hidden[{name!r}] has H={h.shape[-1]} but lm_head_weight is {tuple(self.lm_head_weight.shape)}")
        if self.coord_token_ids.numel() != NUM_COORD_BINS:
            raise ValueError(f"coord_token_ids must hold {NUM_COORD_BINS} ids, got {self.coord_token_ids.numel()}")

    # ------------------------------------------------------------------ mode

    @property
    def mode(self) -> str:
        """"gt" (Stage-1), "channel_a" or "rollout", from the contexts present."""
        return _VALID_CONTEXT_SETS[frozenset(self.hidden)]

    def require_contexts(self, module: str) -> str:
        """The mode, after checking the contexts the channel needs are present (else PipelineError)."""
        if self.channel == "A" and SELF_CONTEXT not in self.hidden:
            raise PipelineError(
                f"module {module!r}: channel A needs hidden states for contexts 'gt' and 'self_context' "
                f"(forwards.expectation_forward), got {sorted(self.hidden)}"
            )
        if self.channel == "B" and ROLLOUT not in self.hidden:
            raise PipelineError(
                f"module {module!r}: channel B needs hidden states for context 'rollout' "
                f"(forwards.rollout_forward on a rollout-built batch), got {sorted(self.hidden)}"
            )
        return self.mode

    def geometry_context(self) -> str:
        """Where geometry / coord diagnostics read logits: self_context (A), rollout, or gt (Stage-1)."""
        return {MODE_GT: GT, MODE_CHANNEL_A: SELF_CONTEXT, MODE_ROLLOUT: ROLLOUT}[self.mode]

    # ------------------------------------------------------------------ cache

    def _cached(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        # An entry computed under no_grad (a diagnostics module) must not serve a later request
        # that needs gradients.
        hit = self._cache.get(key)
        if hit is not None and (hit[1] or not torch.is_grad_enabled()):
            return hit[0]
        value = fn()
        self._cache[key] = (value, torch.is_grad_enabled())
        return value

    # ------------------------------------------------------------------ coord views

    def coord_targets(self) -> CoordTargets:
        """Coord positions with a target (``batch.coord_targets >= 0``), in row-major order."""

        def build() -> CoordTargets:
            flat = self.batch.coord_targets.reshape(-1)
            pos = torch.nonzero(flat >= 0).reshape(-1)
            return CoordTargets(pos=pos, bins=flat.index_select(0, pos).long())

        return self._cached("coord_targets", build)

    def hidden_for(self, context: str, module: str = "?") -> torch.Tensor:
        if context not in self.hidden:
            raise PipelineError(f"module {module!r} needs context {context!r}; this step has {sorted(self.hidden)}")
        return self.hidden[context]

    def coord_logits(self, context: str) -> torch.Tensor:
        """``[N, 1000]`` fp32 coord logits of ``context`` at :meth:`coord_targets` positions."""

        def build() -> torch.Tensor:
            rows = hidden_at_logit_pos(self.hidden_for(context), self.coord_targets().pos)
            return project_coord_logits(rows, self.lm_head_weight, self.coord_token_ids)

        return self._cached(("coord_logits", context), build)

    def coord_full_lse(self, context: str) -> torch.Tensor:
        """``[N]`` full-vocabulary logsumexp of ``context`` at :meth:`coord_targets` positions."""

        def build() -> torch.Tensor:
            rows = hidden_at_logit_pos(self.hidden_for(context), self.coord_targets().pos)
            return full_logsumexp(rows, self.lm_head_weight, self.chunk_size)

        return self._cached(("coord_full_lse", context), build)

    def text_and_full_lse_at(self, context: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(non-coord logsumexp ``[M]``, full logsumexp ``[M]``) at arbitrary flat token positions ``pos`` [M].

        Chunked through the LM head like every projection. Not cached: only the text gate reads
        non-coord positions, once per step.
        """
        rows = hidden_at_logit_pos(self.hidden_for(context), pos.reshape(-1).long())
        return text_and_full_logsumexp(rows, self.lm_head_weight, self.coord_token_ids, self.chunk_size)

    def bbox_view(self, subsets: tuple[int, ...] | None = None, module: str = "?") -> BBoxView:
        """Boxes of ``batch.bbox_groups`` (optionally only the given subset codes) as tensors.

        Every selected coord position must carry a target in ``batch.coord_targets`` equal to the
        group's target bin (one source of truth for what a coord is supervised towards).
        """
        key = ("bbox_view", subsets)

        def build() -> BBoxView:
            groups = [g for g in self.batch.bbox_groups if subsets is None or g.subset in subsets]
            dev = self.batch.coord_targets.device
            if not groups:
                empty = torch.zeros((0, 4), dtype=torch.long, device=dev)
                return BBoxView(empty, empty.clone(), torch.zeros((0,), dtype=torch.long, device=dev), empty.clone())
            pos = torch.tensor([g.coord_pos for g in groups], dtype=torch.long, device=dev)
            bins = torch.tensor([g.target_bins for g in groups], dtype=torch.long, device=dev)
            subset = torch.tensor([g.subset for g in groups], dtype=torch.long, device=dev)
            if pos.shape[1] != 4:
                raise PipelineError(f"module {module!r}: every bbox group needs 4 coord positions, got shape {tuple(pos.shape)}")
            targets = self.coord_targets()
            lookup = torch.full((self.batch.coord_targets.numel(),), -1, dtype=torch.long, device=dev)
            lookup[targets.pos] = torch.arange(targets.pos.numel(), device=dev)
            check = content_checks(lookup)
            if check and (int(pos.min()) < 0 or int(pos.max()) >= lookup.numel()):
                raise PipelineError(f"module {module!r}: bbox group position outside the [B, T] grid")
            index = lookup[pos]
            if check and (index < 0).any():
                g = int(torch.nonzero((index < 0).any(dim=1))[0])
                raise PipelineError(
                    f"module {module!r}: bbox group {g} (flat coord positions {pos[g].tolist()}) has positions with "
                    "coord_targets == -1; the collator/rollout builder must set coord_targets at every supervised box coord"
                )
            mismatch = targets.bins[index] != bins
            if check and mismatch.any():
                g = int(torch.nonzero(mismatch.any(dim=1))[0])
                raise PipelineError(
                    f"module {module!r}: bbox group {g} target bins {bins[g].tolist()} disagree with coord_targets "
                    f"{targets.bins[index[g]].tolist()} at its positions"
                )
            return BBoxView(pos=pos, bins=bins, subset=subset, index=index)

        return self._cached(key, build)

    # ------------------------------------------------------------------ token CE masks

    def token_ce_masks(self, context: str, weights: TokenCEWeights) -> TokenCEMasks:
        """Per-token CE weights of ``context`` (``losses.masks.build_token_ce_weights``), cached per weights."""

        def build() -> TokenCEMasks:
            b = self.batch
            if context == ROLLOUT:
                # The sample says whether it dropped an invalid object (EncodedSample.dropped_invalid);
                # how much that weighs is token_ce's rollout_drop_invalid_struct_ce_multiplier.
                return build_token_ce_weights(
                    context, b.token_types, weights, subset=b.subset, closure=b.closure,
                    dropped_invalid=b.dropped_invalid, segment_ids=b.segment_ids,
                )
            return build_token_ce_weights(context, b.token_types, weights, segment_ids=b.segment_ids)

        return self._cached(("token_ce_masks", context, weights), build)


# Subsets whose boxes feed geometry / coord_reg in the rollout context (FP feeds nothing).
ROLLOUT_GEO_SUBSETS: tuple[int, ...] = (MATCHED, FN)

__all__ = [
    "BBoxView",
    "CoordTargets",
    "MODE_CHANNEL_A",
    "MODE_GT",
    "MODE_ROLLOUT",
    "PipelineError",
    "ROLLOUT_GEO_SUBSETS",
    "TeacherForcingContext",
]
