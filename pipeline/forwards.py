"""Forward strategies: which forwards a step runs and which context each one fills.

- ``gt_forward``: one teacher-forced forward on the batch tokens (Stage-1, and the
  rollout forward of Channel-B / Rollout-Aligned on rollout-built batches).
- ``expectation_forward``: Channel-A. Forward 0 on GT tokens gives the ``gt``
  context; forwards 1..N-1 replace every coord *input* slot by a context
  embedding built from the previous forward's coord distribution at the
  preceding position; the last forward is ``self_context``. The vision tower runs
  once per call and its output is reused by every forward.

All forwards return final hidden states ``[B, T, H]``; losses project only the
positions they need (see ``losses/ce.py``). They run inside the forward of
``pipeline.wrapper.TrainingWrapper`` (what the trainer gives ``accelerator.prepare``):
``model`` is a ``model.forward.HiddenStatesModel`` over the Qwen3-VL model ``vlm``
(the vision tower, the embedding table and rope indices are read from ``vlm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from configs.validation import declared_default
from core.vocab import (
    COORD,
    GRAD_MODES,  # noqa: E402  (also re-exported)
    GT,
    ROLLOUT,
    SELF_CONTEXT,
)
from data.types import PackedBatch
from losses.ce import coord_logits as project_coord_logits
from losses.ce import hidden_at_logit_pos
from losses.coord import context_embeddings
from model.forward import (
    compute_vision,
    embed_tokens,
    hidden_states,
    position_ids_for_batch,
    suffix_hidden_states,
)
from model.prefix_reuse import KVRecorder, PrefixReuse, plan_prefix_reuse


@dataclass
class ForwardResult:
    """Hidden states per context (``[B, T, H]`` each), how many model forwards ran, and how many of
    them ran only the suffixes (Channel-A prefix reuse; 0 when every forward ran in full)."""

    hidden: dict[str, torch.Tensor]
    num_forwards: int
    suffix_forwards: int = 0


def gt_forward(model, vlm, batch: PackedBatch, *, context: str = GT) -> ForwardResult:
    """One teacher-forced forward; the hidden states fill ``context`` (``gt`` or ``rollout``)."""
    if context not in (GT, ROLLOUT):
        raise ValueError(f"gt_forward fills context 'gt' or 'rollout', not {context!r}")
    position_ids = position_ids_for_batch(vlm, batch)
    vision = compute_vision(vlm, batch.pixel_values, batch.image_grid_thw)
    hidden = hidden_states(model, batch, vision=vision, position_ids=position_ids)
    return ForwardResult(hidden={context: hidden}, num_forwards=1)


def rollout_forward(model, vlm, batch: PackedBatch) -> ForwardResult:
    """Channel-B / Rollout-Aligned: one teacher-forced forward on rollout-built sequences."""
    return gt_forward(model, vlm, batch, context=ROLLOUT)


@dataclass(frozen=True)
class ExpectationConfig:
    """Channel-A knobs (``stage2_ab.n_softctx_iter``, ``coord_ctx_embed_mode``, ``softctx_grad_mode``,
    ``softctx_temperature``, ``prefix_reuse``), defaults read from their declarations; see
    :func:`expectation_forward`."""

    n_iter: int = declared_default("stage2_ab.n_softctx_iter")
    embed_mode: str = declared_default("stage2_ab.coord_ctx_embed_mode")
    grad_mode: str = declared_default("stage2_ab.softctx_grad_mode")
    temperature: float = declared_default("stage2_ab.softctx_temperature")
    prefix_reuse: bool = declared_default("stage2_ab.prefix_reuse")


def expectation_forward(
    model,
    vlm,
    batch: PackedBatch,
    coord_token_ids: torch.Tensor,
    *,
    n_iter: int = ExpectationConfig.n_iter,
    embed_mode: str = ExpectationConfig.embed_mode,
    grad_mode: str = ExpectationConfig.grad_mode,
    temperature: float = ExpectationConfig.temperature,
    prefix_reuse: bool = ExpectationConfig.prefix_reuse,
    prefix_reuse_warned: set[str] | None = None,
) -> ForwardResult:
    """Channel-A Expectation step (docs/training/STAGE2_RUNBOOK.md): N forwards, vision once.

    ``coord_token_ids``: ``[1000]`` ids of ``<|coord_0..999|>`` (their input
    embedding rows are the table ``E`` of docs/training/METRICS_LOSSES.md). Coord input positions are the
    GT coord tokens (``token_types == COORD``); their context embedding comes from
    the coord distribution read at ``coord_in_pos - 1`` of the previous forward.
    Text, struct and image inputs stay GT. ``n_iter == 1`` is plain teacher forcing:
    ``self_context`` is then the ``gt`` forward itself.

    ``prefix_reuse`` (``stage2_ab.prefix_reuse``): forwards 2..N recompute only each segment from its
    first coord slot on and take the rest from forward 1 (``model.prefix_reuse``; same losses and
    gradients as full forwards); where the batch or the attention kernel does not allow it they run in full
    (logged once per reason per ``prefix_reuse_warned`` set, the caller's; see ``plan_prefix_reuse``).
    The knobs are ``stage2_ab.*`` keys (``ExpectationConfig``), checked when the config is loaded.
    """
    position_ids = position_ids_for_batch(vlm, batch)
    # host-side planning before any kernel is queued (on a GPU its host copies wait for nothing)
    layout = plan_prefix_reuse(vlm, batch, warned=prefix_reuse_warned) if prefix_reuse and n_iter > 1 else None
    vision = compute_vision(vlm, batch.pixel_values, batch.image_grid_thw)
    if layout is None:
        hidden = hidden_states(model, batch, vision=vision, position_ids=position_ids)
        reuse = None
    else:
        with KVRecorder(vlm) as recorded:
            hidden = hidden_states(model, batch, vision=vision, position_ids=position_ids)
        reuse = PrefixReuse(vlm, recorded, layout, position_ids, hidden)
    result = {GT: hidden}
    if n_iter == 1:
        result[SELF_CONTEXT] = hidden
        return ForwardResult(hidden=result, num_forwards=1)

    B, T = batch.input_ids.shape
    coord_in = (batch.token_types == COORD).reshape(-1).nonzero(as_tuple=True)[0]  # flat positions [N]
    rows, cols = coord_in // T, coord_in % T
    base_embeds = embed_tokens(vlm, batch.input_ids)
    table = embed_tokens(vlm, coord_token_ids)  # E: [1000, H] coord rows of the input table
    lm_weight = vlm.get_output_embeddings().weight
    for _ in range(1, n_iter):
        logits = project_coord_logits(hidden_at_logit_pos(hidden, coord_in), lm_weight, coord_token_ids)
        if grad_mode == "em_detach":
            logits = logits.detach()
        elif grad_mode != "unroll":  # no silent default for a mode a caller mistyped
            raise ValueError(f"stage2_ab.softctx_grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        ctx_embeds = context_embeddings(logits, table, embed_mode, temperature)
        embeds = base_embeds.index_put((rows, cols), ctx_embeds.to(base_embeds.dtype))
        if reuse is None:
            hidden = hidden_states(model, batch, inputs_embeds=embeds, vision=vision, position_ids=position_ids)
        else:
            hidden = suffix_hidden_states(model, embeds, reuse)
    result[SELF_CONTEXT] = hidden
    return ForwardResult(hidden=result, num_forwards=n_iter, suffix_forwards=0 if reuse is None else n_iter - 1)
