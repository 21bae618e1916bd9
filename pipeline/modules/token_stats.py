"""``token_stats`` (diagnostics): supervised token counts per type — the template for a new module.

How a built-in module is built (copy this file; a module outside the project is one file listed in
``custom.plugins``, docs/ARCHITECTURE.md):

1. pick a unique name and a kind (OBJECTIVE returns a loss, DIAGNOSTICS only metrics);
2. declare its config as a frozen dataclass of ``knob(default, doc, <range>)`` fields in
   ``configs/modules.py`` (no fields = takes no config) and declare it in ``MODULES`` (kind, config, doc); the
   allowlist, defaults, types and ranges are enforced at config load by ``configs.pipeline``
   and documented in docs/CONFIG.md by ``python scripts/gen_config_doc.py``;
3. the function takes ``(ctx, spec, settings)`` (its manifest entry; the pipeline-level
   ``PipelineSettings``) and reads only ``ctx``'s derived views (masks, coord targets, cached
   coord logits), never raw rollout meta, and never calls collectives;
4. metric keys carry a reduction-class suffix (docs/training/METRICS_CONTRACT.md): ``_total`` counts are summed over
   micro-steps and ranks, ``_mean``/``_frac`` averaged;
5. import the file in ``pipeline/modules/__init__.py`` and document it in
   docs/training/METRICS_LOSSES.md.

Keys: ``token_stats/{struct,desc,coord,eos}_tokens_total``: tokens with token-CE weight > 0
under the run's ``token_ce`` knobs in the first context of the step (``gt`` or ``rollout``);
coord tokens are those with a coord target (they feed geo / coord_reg, never token CE).
"""

from __future__ import annotations

from core.vocab import COORD, DESC, EOS, GT, ROLLOUT, STRUCT, TOKEN_TYPE_NAMES
from pipeline.context import MODE_ROLLOUT, TeacherForcingContext
from pipeline.registry import ModuleOutput, PipelineSettings, register_module


@register_module("token_stats")  # declared in configs.modules.MODULES
def token_stats(ctx: TeacherForcingContext, spec, settings: PipelineSettings) -> ModuleOutput:
    context = ROLLOUT if ctx.mode == MODE_ROLLOUT else GT
    masks = ctx.token_ce_masks(context, settings.token_ce_weights)
    tt = ctx.batch.token_types
    supervised = {
        STRUCT: (masks.struct > 0) & (tt == STRUCT),
        DESC: masks.desc > 0,
        EOS: (masks.struct > 0) & (tt == EOS),
        COORD: ctx.batch.coord_targets >= 0,
    }
    metrics = {f"token_stats/{TOKEN_TYPE_NAMES[t]}_tokens_total": float(m.sum()) for t, m in supervised.items()}
    return ModuleOutput(metrics=metrics)
