"""``bbox_geo``: SmoothL1 + CIoU on decoded continuous boxes (docs/training/METRICS_LOSSES.md).

Which logits: Stage-1 ``gt``; Channel-A ``self_context`` only; rollout context ``rollout``
on matched (target = matched GT box) and FN (GT box) groups, never FP. Each box decodes its 4
coord distributions with ``ctx.coord_decode_mode`` (``exp`` or ``st``, τ = 1) into fractions;
the target is ``bins / 999``.

Metrics (unweighted means over boxes): ``loss/geo`` = smoothl1_weight x ``loss/geo/smoothl1``
+ ciou_weight x ``loss/geo/ciou`` (``ciou`` is mean(1 - CIoU)); emitted only when a box exists.
"""

from __future__ import annotations

from core.vocab import GEO, NUM_COORD_BINS, loss_key
from losses.coord import decode_coords
from losses.geometry import bbox_geo_loss
from pipeline.context import MODE_ROLLOUT, ROLLOUT_GEO_SUBSETS, PipelineError, TeacherForcingContext
from pipeline.registry import ModuleOutput, PipelineSettings, register_module


@register_module("bbox_geo")  # declared in configs.modules.MODULES
def bbox_geo(ctx: TeacherForcingContext, spec, settings: PipelineSettings) -> ModuleOutput:
    mode = ctx.require_contexts("bbox_geo")
    context = ctx.geometry_context()
    view = ctx.bbox_view(ROLLOUT_GEO_SUBSETS if mode == MODE_ROLLOUT else None, module="bbox_geo")
    targets = ctx.coord_targets()
    if spec.weight > 0 and targets.pos.numel() != 4 * view.num_boxes:
        raise PipelineError(
            f"module 'bbox_geo': {targets.pos.numel()} coord positions carry targets but batch.bbox_groups gives "
            f"{view.num_boxes} boxes ({4 * view.num_boxes} positions) for this context; the collator / rollout builder "
            "must put every supervised box in bbox_groups (or disable bbox_geo in the pipeline)"
        )
    logits = ctx.coord_logits(context).index_select(0, view.index.reshape(-1))
    pred = decode_coords(logits, ctx.coord_decode_mode).reshape(-1, 4)
    target = view.bins.to(pred.dtype) / (NUM_COORD_BINS - 1)
    geo = bbox_geo_loss(pred, target, float(spec.config["smoothl1_weight"]), float(spec.config["ciou_weight"]))
    metrics = {}
    if view.num_boxes:
        metrics = {
            loss_key(GEO): geo.total,
            loss_key(GEO, "smoothl1"): geo.smoothl1,
            loss_key(GEO, "ciou"): geo.ciou,
        }
    return ModuleOutput(loss=geo.total, metrics=metrics)
