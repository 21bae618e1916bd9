"""``coord_diag`` (diagnostics): how the coord distributions look where geometry reads them.

Context: ``gt`` (Stage-1), ``self_context`` (Channel-A), ``rollout`` (matched + FN coords).
Runs under no_grad (the executor); all values are means over the N coord positions with a
target, plus one counter. Keys (docs/training/METRICS_CONTRACT.md classes: ``_mean``/``_frac`` mean-like, ``_total`` summed).
Each mean also goes out as an internal position sum (``coord_diag/_<name>_sum``) so the step value
is ``Σ sums / Σ coord_positions_total`` over micro-steps and ranks
(``training.aggregator.STEP_DERIVED``), not a mean of per-micro-step means:

- ``coord_diag/entropy_mean``: entropy of p = softmax(s) over the 1000 coord bins (nats)
- ``coord_diag/exp_argmax_gap_mean``: |expectation decode − argmax/999| (fractions): the
  forward gap the ST bridge hides (0 for a one-hot distribution)
- ``coord_diag/exp_abs_err_mean``: |expectation decode − target/999| (fractions)
- ``coord_diag/bin_acc_frac``: fraction with |argmax − target| <= ``bin_tolerance`` bins
- ``coord_diag/coord_mass_mean``: probability mass of the full softmax on the coord vocabulary
  (only when ``coord_mass``: it needs a full-vocabulary logsumexp at every coord position)
- ``coord_diag/coord_positions_total``: N
"""

from __future__ import annotations

import torch

from core.vocab import NUM_COORD_BINS
from losses.coord import coord_probs, expectation_decode
from losses.coord_reg import entropy
from pipeline.context import TeacherForcingContext
from pipeline.registry import ModuleOutput, PipelineSettings, register_module

COORD_DIAG_MEANS: tuple[str, ...] = (
    "entropy_mean", "exp_argmax_gap_mean", "exp_abs_err_mean", "bin_acc_frac", "coord_mass_mean"
)
COORD_DIAG_SUM = "coord_diag/_{}_sum"  # internal: the mean's numerator over the micro-step's positions
COORD_DIAG_DEN = "coord_diag/_{}_den"  # internal: its positions (the step's mean: training.aggregator.sum_den_ratios)


@register_module("coord_diag")  # declared in configs.modules.MODULES
def coord_diag(ctx: TeacherForcingContext, spec, settings: PipelineSettings) -> ModuleOutput:
    context = ctx.geometry_context()
    targets = ctx.coord_targets()
    n = targets.pos.numel()
    metrics: dict[str, torch.Tensor | float] = {"coord_diag/coord_positions_total": float(n)}
    if n == 0:
        return ModuleOutput(metrics=metrics)
    logits = ctx.coord_logits(context).detach()
    x_exp = expectation_decode(logits)
    argmax = coord_probs(logits).argmax(dim=-1)
    scale = NUM_COORD_BINS - 1
    tol = int(spec.config["bin_tolerance"])
    per_position = {
        "entropy_mean": entropy(logits),
        "exp_argmax_gap_mean": (x_exp - argmax.float() / scale).abs(),
        "exp_abs_err_mean": (x_exp - targets.bins.float() / scale).abs(),
        "bin_acc_frac": ((argmax - targets.bins).abs() <= tol).float(),
    }
    if spec.config["coord_mass"]:
        full = ctx.coord_full_lse(context).detach()
        per_position["coord_mass_mean"] = (torch.logsumexp(logits, dim=-1) - full).clamp_max(0.0).exp()
    for name, values in per_position.items():
        metrics[f"coord_diag/{name}"] = values.mean()
        metrics[COORD_DIAG_SUM.format(name)] = values.sum()
        metrics[COORD_DIAG_DEN.format(name)] = float(n)
    return ModuleOutput(metrics=metrics)
