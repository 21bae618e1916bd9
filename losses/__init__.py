"""Pure loss math of CoordExp: tensors in, tensors out (no model, config, wandb, pycocotools, vllm).

Index of the math (docs/training/METRICS_LOSSES.md). Alignment: per-token tensors are indexed by token
position j; logits predicting token j are read at j − 1. Bins k ∈ 0..999, fractions v_k = k/999.

(The vocabulary: token types, subsets, contexts, components, ``loss_key``: ``core.vocab``; token
typing of BPE tokens: ``data.tokens``.)
masks         ``build_token_ce_weights`` → TokenCEMasks(struct [B,T], desc [B,T]):
                gt: struct+eos 1, desc desc_ce_weight;
                self_context: struct+eos self_context_struct_ce_weight, desc 0;
                rollout: matched/NO_SUBSET struct w_prefix, matched desc 0; fp 0; fn struct 1,
                desc rollout_fn_desc_weight; struct × drop-invalid multiplier where dropped_invalid; closure ``}`` and eos = 1.
              ``text_gate_positions``: struct/desc with weight > 0, not eos.
ce            ``token_ce``: mean = Σ_j w_j CE_j / max(Σ_j w_j, eps),
                CE_j = logsumexp(W h_{j−1}) − (W h_{j−1})[id_j], chunked, no [B,T,V] tensor.
              ``full_logsumexp`` [N], ``coord_logits`` s = W[coord_ids] h → [N, 1000],
                ``text_and_full_logsumexp`` → (lse over non-coord ids [N], full lse [N]), chunked.
coord         p = softmax(s/τ); exp decode x = Σ p_k v_k; st decode x = v_argmax + (x − sg(x));
              context embeddings soft = pᵀE, hard = E_argmax, st = hard + (soft − sg(soft)).
geometry      canonicalise (min/max, hi ≥ lo + eps); SmoothL1 (β = 0.01 fractions) mean of 4;
              CIoU = IoU − ρ²/c² − αv, v = 4/π²(atan(w_g/h_g) − atan(w/h))², α = v/(1 − IoU + v + eps)
              (α under no_grad); geo = w_sl1·mean SmoothL1 + w_ciou·mean(1 − CIoU).
coord_reg     coord_ce = −log p_t (τ = 1); q_k ∝ exp(−½((k − t)/σ)²) truncated at |k − t| > truncate;
              soft_ce = −Σ q log p; w1 = Σ_k |CDF_p − CDF_q| / 999; entropy = −Σ p log p;
              el1 = Σ p |v_k − v_t|; ehuber = Σ p huber_δ(|v_k − v_t|);
              coord_gate = −log(p_coord + eps), p_coord = exp(lse_coord − lse_full);
              text_gate = −log(1 − p_coord + eps) with 1 − p_coord = exp(lse_text − lse_full)
              computed directly (no cancellation when p_coord → 1). coord_ce + coord_gate (eps = 0) = full-vocab CE.
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
