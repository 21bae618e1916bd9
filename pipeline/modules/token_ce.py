"""``token_ce``: CE on struct (+ eos) and desc tokens, per context masks (docs/training/METRICS_LOSSES.md).

Which logits (docs/training/METRICS_LOSSES.md): Stage-1 ``gt``; Channel-A struct/eos/desc from ``gt`` plus the
struct/eos stabiliser from ``self_context``; rollout context ``rollout``.

Each context mean is the spec's ``sum(w_t CE_t) / max(sum(w_t), eps)`` with the mask of
``losses.masks.build_token_ce_weights``. A mask that is one scalar times an indicator
(gt desc: ``desc_ce_weight``; self_context struct: ``self_context_struct_ce_weight``; rollout
desc: ``rollout_fn_desc_weight``) would cancel in that ratio, so that scalar multiplies the
mean instead; masks with per-token differences (rollout struct: matched prefix vs FN tokens,
drop-invalid multiplier, closure/eos) keep them inside the mean. Hence

    loss/struct_ce = 1 x mean_struct(first context) [+ self_context_struct_ce_weight x mean_struct(self_context)]
    loss/desc_ce   = desc scalar x mean_desc
    module loss    = loss/struct_ce + loss/desc_ce

and, in Channel-A, ``loss/struct_ce/gt`` and ``loss/struct_ce/self_context`` are the unweighted
context means. A key is emitted only when its mask has positive weight somewhere (no zero that
would dilute the per-step mean).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from core.vocab import DESC_CE, GT, ROLLOUT, SELF_CONTEXT, STRUCT_CE, loss_key
from losses.ce import token_ce as token_ce_math
from pipeline.context import MODE_CHANNEL_A, MODE_ROLLOUT, TeacherForcingContext
from pipeline.registry import ModuleOutput, PipelineSettings, register_module


def _ce(ctx: TeacherForcingContext, context: str, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = ctx.batch
    return token_ce_math(ctx.hidden[context], ctx.lm_head_weight, b.input_ids, weights, ctx.chunk_size)


@register_module("token_ce")  # declared in configs.modules.MODULES
def token_ce(ctx: TeacherForcingContext, spec, settings: PipelineSettings) -> ModuleOutput:
    mode = ctx.require_contexts("token_ce")
    w = settings.token_ce_weights  # this entry's config, built once per run by the executor (pipeline_settings)
    metrics: dict[str, torch.Tensor] = {}

    # The first context (rollout in Rollout steps, gt otherwise) and its desc scalar.
    first, desc_scale = (ROLLOUT, w.rollout_fn_desc_weight) if mode == MODE_ROLLOUT else (GT, w.desc_ce_weight)
    masks = ctx.token_ce_masks(first, w)
    struct_mean, struct_sum = _ce(ctx, first, masks.struct)
    desc_mean, desc_sum = _ce(ctx, first, masks.desc)
    struct = struct_mean
    desc = float(desc_scale) * desc_mean
    has_struct = bool(struct_sum > 0)
    if mode == MODE_CHANNEL_A:
        w_sc = float(w.self_context_struct_ce_weight)
        # The indicator mask (weight 1) gives the unweighted self_context mean, logged even at
        # weight 0; the graph is only kept when the stabiliser actually enters the loss.
        sc_masks = ctx.token_ce_masks(SELF_CONTEXT, replace(w, self_context_struct_ce_weight=1.0))
        with torch.set_grad_enabled(torch.is_grad_enabled() and w_sc > 0):
            sc_mean, sc_sum = _ce(ctx, SELF_CONTEXT, sc_masks.struct)
        if w_sc > 0:
            struct = struct + w_sc * sc_mean
        if struct_sum > 0:
            metrics[loss_key(STRUCT_CE, context=GT)] = struct_mean
        if sc_sum > 0:
            metrics[loss_key(STRUCT_CE, context=SELF_CONTEXT)] = sc_mean
        has_struct = has_struct or bool(sc_sum > 0)

    if has_struct:
        metrics[loss_key(STRUCT_CE)] = struct
    if desc_sum > 0:
        metrics[loss_key(DESC_CE)] = desc
    return ModuleOutput(loss=struct + desc, metrics=metrics)
