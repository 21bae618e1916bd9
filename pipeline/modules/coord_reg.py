"""``coord_reg``: coord-distribution regularisers and the coord/text gates (docs/training/METRICS_LOSSES.md).

Which logits: Stage-1 ``gt``; rollout context ``rollout`` (matched + FN coord positions, never
FP); Channel-A: every configured term on ``gt`` coord positions, plus ``soft_ce`` on
``self_context`` coord positions weighted by ``self_context_soft_ce_weight``. The text gate
runs at struct/desc positions whose token-CE weight is > 0 under the run's ``token_ce`` knobs
(``losses.masks.text_gate_positions``) in the same context.

Metrics (each an unweighted mean over its positions, emitted only when it has positions):

- ``loss/coord_token_ce``: hard CE over the 1000 coord logits, always computed (monitoring)
  even at ``coord_ce_weight`` 0;
- ``loss/coord_reg/<sub>`` for every sub-term with weight > 0 (soft_ce, w1, entropy, el1,
  ehuber, coord_gate, text_gate). In Channel-A ``soft_ce`` carries its context suffix
  (``loss/coord_reg/soft_ce/self_context``, and ``/gt`` when ``soft_ce_weight`` > 0);
- ``loss/coord_reg`` = the module loss = Σ weight x sub-term mean (coord_ce included).
"""

from __future__ import annotations

import torch

from core.vocab import COORD_REG, COORD_TOKEN_CE, GT, SELF_CONTEXT, loss_key
from losses.coord_reg import coord_ce, coord_gate, entropy, expected_huber, expected_l1, soft_ce, text_gate, w1
from losses.masks import text_gate_positions
from pipeline.context import MODE_CHANNEL_A, TeacherForcingContext
from pipeline.registry import ModuleOutput, PipelineSettings, register_module


@register_module("coord_reg")  # declared in configs.modules.MODULES
def coord_reg(ctx: TeacherForcingContext, spec, settings: PipelineSettings) -> ModuleOutput:
    mode = ctx.require_contexts("coord_reg")
    cfg = spec.config
    tau = float(cfg["temperature"])
    sigma = float(cfg["target_sigma"])
    trunc = cfg["target_truncate"]
    main = GT if mode == MODE_CHANNEL_A else ctx.geometry_context()
    targets = ctx.coord_targets()
    bins = targets.bins
    have_coords = targets.pos.numel() > 0
    metrics: dict[str, torch.Tensor] = {}
    total = None

    def add(weight: float, value: torch.Tensor) -> None:
        nonlocal total
        term = weight * value
        total = term if total is None else total + term

    if have_coords:
        logits = ctx.coord_logits(main)
        ce = coord_ce(logits, bins).mean()
        metrics[loss_key(COORD_TOKEN_CE)] = ce
        add(float(cfg["coord_ce_weight"]), ce)
        soft_key = loss_key(COORD_REG, "soft_ce", GT if mode == MODE_CHANNEL_A else None)
        terms = (
            ("soft_ce_weight", soft_key, lambda: soft_ce(logits, bins, sigma, trunc, tau)),
            ("w1_weight", loss_key(COORD_REG, "w1"), lambda: w1(logits, bins, sigma, trunc, tau)),
            ("coord_entropy_weight", loss_key(COORD_REG, "entropy"), lambda: entropy(logits, tau)),
            ("coord_el1_weight", loss_key(COORD_REG, "el1"), lambda: expected_l1(logits, bins, tau)),
            ("coord_ehuber_weight", loss_key(COORD_REG, "ehuber"),
             lambda: expected_huber(logits, bins, float(cfg["coord_huber_delta"]), tau)),
            ("coord_gate_weight", loss_key(COORD_REG, "coord_gate"),
             lambda: coord_gate(torch.logsumexp(logits, dim=-1), ctx.coord_full_lse(main))),
        )
        for weight_key, key, fn in terms:
            weight = float(cfg[weight_key])
            if weight > 0:
                value = fn().mean()
                metrics[key] = value
                add(weight, value)
        w_sc = float(cfg["self_context_soft_ce_weight"])
        if mode == MODE_CHANNEL_A and w_sc > 0:
            value = soft_ce(ctx.coord_logits(SELF_CONTEXT), bins, sigma, trunc, tau).mean()
            metrics[loss_key(COORD_REG, "soft_ce", SELF_CONTEXT)] = value
            add(w_sc, value)

    w_text = float(cfg["text_gate_weight"])
    if w_text > 0:
        gate_pos = text_gate_positions(ctx.token_ce_masks(main, settings.token_ce_weights))
        pos = torch.nonzero(gate_pos.reshape(-1)).reshape(-1)
        if pos.numel():
            value = text_gate(*ctx.text_and_full_lse_at(main, pos)).mean()
            metrics[loss_key(COORD_REG, "text_gate")] = value
            add(w_text, value)

    if total is None:
        # Nothing to supervise in this micro-step: an exact 0 that still reaches the graph so
        # backward() runs the same collectives on every rank.
        total = sum(h.sum() for h in ctx.hidden.values()) * 0.0
    else:
        metrics[loss_key(COORD_REG)] = total
    return ModuleOutput(loss=total, metrics=metrics)
