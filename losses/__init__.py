"""Pure loss math of CoordExp: tensors in, tensors out (no model, config, wandb, pycocotools, vllm).

Each formula is written once, in the docstring of the function that computes it; what each logged
key means is docs/training/METRICS_LOSSES.md. Alignment: per-token tensors are indexed by token
position j; logits predicting token j are read at j − 1. Bins k ∈ 0..999, fractions v_k = k/999.
(The vocabulary: token types, subsets, contexts, components, ``loss_key``: ``core.vocab``; token
typing of BPE tokens: ``data.tokens``.)

masks.py      ``build_token_ce_weights`` (per-context struct/desc weights), ``text_gate_positions``
ce.py         ``token_ce`` (chunked weighted CE, no [B,T,V] tensor), ``full_logsumexp``, ``coord_logits``,
              ``text_and_full_logsumexp``
coord.py      ``coord_probs``, ``expectation_decode``, ``st_decode``, ``decode_coords``, ``context_embeddings``
geometry.py   ``canonicalize_boxes``, ``smooth_l1_per_box``, ``ciou``, ``bbox_geo_loss``
coord_reg.py  ``coord_ce``, ``gaussian_targets``, ``soft_ce``, ``w1``, ``entropy``, ``expected_l1``,
              ``expected_huber``, ``coord_gate``, ``text_gate``
"""
from losses.ce import coord_logits, full_logsumexp, hidden_at_logit_pos, text_and_full_logsumexp, token_ce
from losses.coord import (
    DECODE_MODES,
    EMBED_MODES,
    bin_values,
    context_embeddings,
    coord_probs,
    decode_coords,
    expectation_decode,
    st_decode,
)
from losses.coord_reg import (
    coord_ce,
    coord_gate,
    entropy,
    expected_huber,
    expected_l1,
    gaussian_targets,
    soft_ce,
    text_gate,
    w1,
)
from losses.geometry import SMOOTHL1_BETA, GeoLoss, bbox_geo_loss, canonicalize_boxes, ciou, smooth_l1_per_box
from losses.masks import TokenCEKnobs, TokenCEMasks, build_token_ce_weights, text_gate_positions

__all__ = [
    "DECODE_MODES",
    "EMBED_MODES",
    "SMOOTHL1_BETA",
    "GeoLoss",
    "TokenCEMasks",
    "TokenCEKnobs",
    "bbox_geo_loss",
    "bin_values",
    "build_token_ce_weights",
    "canonicalize_boxes",
    "ciou",
    "context_embeddings",
    "coord_ce",
    "coord_gate",
    "coord_logits",
    "coord_probs",
    "decode_coords",
    "entropy",
    "expectation_decode",
    "expected_huber",
    "expected_l1",
    "full_logsumexp",
    "text_and_full_logsumexp",
    "gaussian_targets",
    "hidden_at_logit_pos",
    "smooth_l1_per_box",
    "soft_ce",
    "st_decode",
    "text_gate",
    "text_gate_positions",
    "token_ce",
    "w1",
]
