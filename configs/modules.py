"""The ``config`` maps of the built-in pipeline modules: one frozen dataclass per module, one knob per key.

These fields are the modules' config allowlists, defaults, types and ranges (``configs.pipeline``
validates a written ``config`` against the schema generated from them, with the loader's
validator) and the per-key docs of docs/CONFIG.md. The flat objective knobs of ``configs/types.py``
(``stage2_ab.*_weight``, ``custom.coord_soft_ce_w1.*``) are declared as aliases of these keys, so
a range such as the drop-invalid multiplier's [1, 4] is written once, here.

``TokenCEWeights`` is also what the mask builder (``losses.masks``) reads.
``MODULES`` declares each built-in module: kind, config class (``token_stats`` takes none: :class:`NoConfig`), doc.
"""

from __future__ import annotations

from dataclasses import dataclass

from configs.declare import knob


@dataclass(frozen=True)
class TokenCEWeights:
    """Knobs of ``token_ce``: CE on struct (+ eos) and desc tokens (docs/training/METRICS_LOSSES.md)."""

    MODULE = "token_ce"

    desc_ce_weight: float = knob(1.0, "scale of the gt desc CE mean (Stage-1, Channel-A)", minimum=0.0)
    self_context_struct_ce_weight: float = knob(0.1, "Channel-A struct/eos stabiliser on self_context", minimum=0.0)
    rollout_fn_desc_weight: float = knob(1.0, "scale of the desc CE mean of appended FN objects (rollout)", minimum=0.0)
    rollout_matched_prefix_struct_weight: float = knob(
        1.0, "per-token struct weight of matched objects and prefix struct (FN struct is 1)", minimum=0.0)
    rollout_drop_invalid_struct_ce_multiplier: float = knob(
        1.0, "struct weights of a rollout that dropped an invalid object", minimum=1.0, maximum=4.0)
    # No check on construction: the token_ce module builds a variant every Channel-A micro-step; a written
    # config is checked against these declarations once, when the pipeline is resolved (configs.pipeline).


@dataclass(frozen=True)
class BBoxGeoConfig:
    """Knobs of ``bbox_geo``: SmoothL1 + CIoU on decoded boxes (loss/geo)."""

    MODULE = "bbox_geo"

    smoothl1_weight: float = knob(1.0, "weight of SmoothL1 (beta = 0.01 fractions) inside loss/geo", minimum=0.0)
    ciou_weight: float = knob(1.0, "weight of (1 - CIoU) inside loss/geo", minimum=0.0)


@dataclass(frozen=True)
class CoordRegConfig:
    """Knobs of ``coord_reg``: coord-distribution regularisers and the coord/text gates (loss/coord_reg)."""

    MODULE = "coord_reg"

    coord_ce_weight: float = knob(0.0, "hard CE over the coord logits (logged as loss/coord_token_ce)", minimum=0.0)
    soft_ce_weight: float = knob(0.0, "CE against the Gaussian bin target", minimum=0.0)
    self_context_soft_ce_weight: float = knob(0.05, "Channel-A soft_ce on self_context coord positions", minimum=0.0)
    w1_weight: float = knob(0.0, "1-Wasserstein between p and the Gaussian target q: sum_k |CDF_p - CDF_q| / 999 (fractions)", minimum=0.0)
    coord_entropy_weight: float = knob(0.0, "entropy of p (nats)", minimum=0.0)
    coord_el1_weight: float = knob(0.0, "expected L1 |v_k - v_t| under p (fractions)", minimum=0.0)
    coord_ehuber_weight: float = knob(0.0, "expected Huber under p (fractions)", minimum=0.0)
    coord_huber_delta: float = knob(0.001, "Huber delta of ehuber (fractions), > 0", exclusive_minimum=0.0)
    coord_gate_weight: float = knob(0.0, "-log(p_coord + eps) at coord positions (p_coord: coord-vocabulary mass of the full softmax)", minimum=0.0)
    text_gate_weight: float = knob(0.0, "-log(1 - p_coord + eps) at struct/desc positions whose token-CE weight > 0 under the run's token_ce "
                                   "knobs (never eos, never FP); numerics in docs/training/METRICS_LOSSES.md", minimum=0.0)
    temperature: float = knob(1.0, "tau of p = softmax(s / tau) for soft_ce / w1 / entropy / el1 / ehuber (not coord_ce, not the gates)", exclusive_minimum=0.0)
    target_sigma: float = knob(2.0, "Gaussian target width (bins)", exclusive_minimum=0.0)
    target_truncate: int | None = knob(None, "zero the target beyond this many bins; null = off", minimum=0)


@dataclass(frozen=True)
class CoordDiagConfig:
    """Knobs of ``coord_diag`` (diagnostics): coord distributions where geometry reads them."""

    MODULE = "coord_diag"

    bin_tolerance: int = knob(0, "bins of slack for coord_diag/bin_acc_frac", minimum=0)
    coord_mass: bool = knob(True, "emit coord_diag/coord_mass_mean (one full-vocabulary logsumexp per coord position, shared with "
                             "coord_reg's coord_gate)")


@dataclass(frozen=True)
class NoConfig:
    """Takes no config (any key is refused)."""


# ---------------------------------------------------------------- module declarations

OBJECTIVE = "objective"
DIAGNOSTICS = "diagnostics"
KINDS: tuple[str, ...] = (OBJECTIVE, DIAGNOSTICS)


@dataclass(frozen=True)
class ModuleDecl:
    """What a pipeline config needs to know of a module (``configs.pipeline`` resolves a manifest from these):
    its kind, its config dataclass (allowlist, defaults, ranges) and its one-line doc. The function that runs
    it is registered beside it by ``pipeline.registry.register_module``."""

    name: str
    kind: str
    config: type
    doc: str


# The built-in modules (their functions: pipeline/modules/); a plugin declares its own through register_module.
MODULES: dict[str, ModuleDecl] = {
    d.name: d for d in (
        ModuleDecl("token_ce", OBJECTIVE, TokenCEWeights,
                   "CE on struct (+ eos) and desc tokens, per-context masks (loss/struct_ce, loss/desc_ce)."),
        ModuleDecl("bbox_geo", OBJECTIVE, BBoxGeoConfig, "Box loss on decoded boxes: smoothl1_weight * SmoothL1 + "
                   "ciou_weight * (1 - CIoU), mean over boxes (loss/geo)."),
        ModuleDecl("coord_reg", OBJECTIVE, CoordRegConfig, "Coord-distribution terms: coord CE, soft CE, W1, entropy, "
                   "expected L1 / Huber, coord and text gates (loss/coord_token_ce, loss/coord_reg)."),
        ModuleDecl("coord_diag", DIAGNOSTICS, CoordDiagConfig, "Coord entropy, expectation-vs-argmax gap, expectation "
                   "error, bin accuracy and coord mass at geometry coord positions."),
        ModuleDecl("token_stats", DIAGNOSTICS, NoConfig,
                   "Supervised token counts per type (token_stats/<type>_tokens_total)."),
    )
}


def declare_module(decl: ModuleDecl) -> None:
    """Add a module declared outside this file (a plugin); the same declaration again is a no-op."""
    if decl.kind not in KINDS:
        raise ValueError(f"module kind {decl.kind!r} unknown; allowed: {', '.join(KINDS)}")
    known = MODULES.get(decl.name)
    if known is not None and (known.kind, known.config) != (decl.kind, decl.config):
        raise ValueError(f"pipeline module {decl.name!r} is already declared ({known.kind}, {known.config.__name__}); "
                         "module names must be unique")
    MODULES.setdefault(decl.name, decl)


__all__ = ["DIAGNOSTICS", "KINDS", "MODULES", "OBJECTIVE", "BBoxGeoConfig", "CoordDiagConfig", "CoordRegConfig",
           "ModuleDecl", "NoConfig", "TokenCEWeights", "declare_module"]
