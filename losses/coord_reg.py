"""Coord-distribution regularisers (docs/training/METRICS_LOSSES.md ``coord_reg``), per position.

Inputs: ``coord_logits`` ``[N, 1000]`` at coord output positions, ``target_bins`` ``[N]``
long in 0..999. Every function returns ``[N]`` fp32 values (nats for CE/entropy/gates,
fractions for W1/EL1/EHuber); the pipeline takes means over positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.vocab import NUM_COORD_BINS
from losses.checks import content_checks
from losses.coord import bin_values


def _check(coord_logits: torch.Tensor, target_bins: torch.Tensor | None, temperature: float = 1.0) -> None:
    if coord_logits.dim() != 2 or coord_logits.shape[-1] != NUM_COORD_BINS:
        raise ValueError(f"coord_logits must be [N, {NUM_COORD_BINS}], got {tuple(coord_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if target_bins is not None:
        if target_bins.shape != coord_logits.shape[:1]:
            raise ValueError(f"target_bins must be [N={coord_logits.shape[0]}], got {tuple(target_bins.shape)}")
        if target_bins.numel() and content_checks(target_bins) and (int(target_bins.min()) < 0 or int(target_bins.max()) >= NUM_COORD_BINS):
            raise ValueError(f"target_bins must lie in 0..{NUM_COORD_BINS - 1}, got range "
                             f"[{int(target_bins.min())}, {int(target_bins.max())}]")


def _log_p(coord_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(coord_logits.float() / temperature, dim=-1)


def gaussian_targets(target_bins: torch.Tensor, sigma: float = 2.0, truncate: int | None = None) -> torch.Tensor:
    """[N] bins -> [N, 1000] q_k ∝ exp(−½((k − t)/σ)²), 0 where |k − t| > truncate; rows sum to 1.

    Built as a softmax of log-weights so a tiny σ degrades to a one-hot instead of 0/0.
    """
    if not sigma > 0:
        raise ValueError(f"coord_reg.target_sigma must be > 0, got {sigma}")
    if truncate is not None and truncate < 0:
        raise ValueError(f"coord_reg.target_truncate must be null or an int >= 0, got {truncate}")
    k = torch.arange(NUM_COORD_BINS, device=target_bins.device, dtype=torch.float32)
    d = k[None, :] - target_bins.to(torch.float32)[:, None]
    logw = -0.5 * (d / sigma) ** 2
    if truncate is not None:
        logw = logw.masked_fill(d.abs() > truncate, float("-inf"))
    return torch.softmax(logw, dim=-1)


def coord_ce(coord_logits: torch.Tensor, target_bins: torch.Tensor) -> torch.Tensor:
    """[N]: hard CE of the target bin over the 1000 coord logits (no temperature: it must
    add up with ``coord_gate`` to the plain full-vocabulary CE)."""
    _check(coord_logits, target_bins)
    return F.cross_entropy(coord_logits.float(), target_bins.long(), reduction="none")


def soft_ce(
    coord_logits: torch.Tensor,
    target_bins: torch.Tensor,
    sigma: float = 2.0,
    truncate: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[N]: −Σ_k q_k log p_k with q the Gaussian target and p = softmax(s/τ)."""
    _check(coord_logits, target_bins, temperature)
    q = gaussian_targets(target_bins, sigma, truncate)
    # q_k = 0 where p_k may be -inf in log space: mask to avoid 0 * -inf = NaN.
    logp = _log_p(coord_logits, temperature)
    return -(torch.where(q > 0, q * logp, torch.zeros_like(logp))).sum(dim=-1)


def w1(
    coord_logits: torch.Tensor,
    target_bins: torch.Tensor,
    sigma: float = 2.0,
    truncate: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[N]: 1-Wasserstein distance in fractions, Σ_k |CDF_p(k) − CDF_q(k)| / 999."""
    _check(coord_logits, target_bins, temperature)
    p = _log_p(coord_logits, temperature).exp()
    q = gaussian_targets(target_bins, sigma, truncate)
    return (p.cumsum(-1) - q.cumsum(-1)).abs().sum(-1) / (NUM_COORD_BINS - 1)


def entropy(coord_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N]: −Σ p_k log p_k (nats) of p = softmax(s/τ)."""
    _check(coord_logits, None, temperature)
    logp = _log_p(coord_logits, temperature)
    p = logp.exp()
    return -(torch.where(p > 0, p * logp, torch.zeros_like(logp))).sum(-1)


def expected_l1(coord_logits: torch.Tensor, target_bins: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N]: Σ_k p_k |v_k − v_t| in fractions."""
    _check(coord_logits, target_bins, temperature)
    p = _log_p(coord_logits, temperature).exp()
    v = bin_values(p.device)
    d = (v[None, :] - v[target_bins.long()][:, None]).abs()
    return (p * d).sum(-1)


def expected_huber(
    coord_logits: torch.Tensor, target_bins: torch.Tensor, delta: float = 0.001, temperature: float = 1.0
) -> torch.Tensor:
    """[N]: Σ_k p_k h(|v_k − v_t|), h(d) = ½d² if d ≤ δ else δ(d − ½δ) (torch.huber_loss
    convention, fractions; δ = ``coord_huber_delta``)."""
    _check(coord_logits, target_bins, temperature)
    if not delta > 0:
        raise ValueError(f"coord_reg.coord_huber_delta must be > 0, got {delta}")
    p = _log_p(coord_logits, temperature).exp()
    v = bin_values(p.device)
    d = (v[None, :] - v[target_bins.long()][:, None]).abs()
    h = torch.where(d <= delta, 0.5 * d * d, delta * (d - 0.5 * delta))
    return (p * h).sum(-1)


def coord_gate(coord_lse: torch.Tensor, full_lse: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N]: −log(p_coord + eps), p_coord = exp(coord_lse − full_lse) the coord-vocabulary mass.

    With eps = 0 this is exactly ``full_lse − coord_lse`` (computed that way, no exp/log round trip).
    """
    log_mass = (coord_lse.float() - full_lse.float()).clamp_max(0.0)
    if eps == 0:
        return -log_mass
    return -torch.log(log_mass.exp() + eps)


def text_gate(text_lse: torch.Tensor, full_lse: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N]: −log(1 − p_coord + eps) at struct/desc positions (penalises coord mass there).

    ``text_lse`` is the logsumexp over the non-coord vocabulary (``losses.ce.text_and_full_logsumexp``),
    so ``1 − p_coord = exp(text_lse − full_lse)`` is the text mass computed directly. Forming it as
    ``1 − exp(coord_lse − full_lse)`` instead loses it exactly where the gate matters: with nearly
    all mass on coord tokens (``1 − p < 1e-4``) the fp32 difference of two large logsumexps rounds
    to a few ulps, off by up to ~1 nat. The ``+ eps`` is added in log space (``logaddexp``).
    With eps = 0 this is exactly ``full_lse − text_lse``.
    """
    log_text_mass = (text_lse.float() - full_lse.float()).clamp_max(0.0)
    if eps == 0:
        return -log_text_mass
    return -torch.logaddexp(log_text_mass, log_text_mass.new_tensor(math.log(eps)))
