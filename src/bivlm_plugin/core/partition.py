"""Gaussian-quantile partition of a weight matrix into inlier rings and salient weights.

Bi-VLM (DESIGN.md section 1, step 1) treats the weights of a row (or of a layer) as Gaussian with
mean mu and std sigma. With a salient share p_sal and N inlier rings, ring k (1-based) holds
t_(k-1) < |w - mu| <= t_k with t_k = sigma * PhiInv((1 + k * p_uns) / 2), p_uns = (1 - p_sal) / N,
so each ring holds p_uns of a Gaussian's mass and the tail beyond t_N (share p_sal) is salient.

Two ways to pick the salient weights are offered (``salient_select``):

- ``"threshold"``: each row counts its weights beyond t_N (the Gaussian rule); counts differ by
  row, so storage needs a per-row count.
- ``"topk"``: every row takes exactly k = round(p_sal * in) weights; the count is stored once.

In both modes an optional ``saliency`` score (for example the Hessian-aware score of
``saliency_score``) decides *which* weights of a row are salient; without it the largest |w - mu|
are taken. Non-goals: choosing p_sal (``bivlm.py``) and the binarization itself (``binarize.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = [
    "STATS_MODES",
    "SALIENT_SELECT_MODES",
    "Partition",
    "gaussian_thresholds",
    "partition",
    "row_stats",
    "saliency_ranking",
    "saliency_score",
    "salient_count",
]

logger = logging.getLogger(__name__)

STATS_MODES = ("row", "layer")
SALIENT_SELECT_MODES = ("topk", "threshold")

# Rows with zero spread would give zero thresholds and put every weight in ring 0 anyway; the
# floor only keeps divisions finite.
_SIGMA_FLOOR = 1e-12


def _check_shares(p_sal: float, n_rings: int) -> None:
    if not 0.0 <= float(p_sal) < 1.0:
        raise ValueError(
            f"p_sal must be in [0, 1) (a share of the weights), got {p_sal}; e.g. 0.01 for 1%"
        )
    if isinstance(n_rings, bool) or not isinstance(n_rings, int) or not 1 <= n_rings <= 256:
        raise ValueError(
            f"n_rings must be an int in [1, 256] (ring indices are stored as uint8), "
            f"got {n_rings!r}"
        )


def gaussian_thresholds(sigma: torch.Tensor | float, p_sal: float, n_rings: int) -> torch.Tensor:
    """Ring thresholds t_1..t_N on |w - mu| for a Gaussian of std ``sigma``.

    t_k = sigma * PhiInv((1 + k * p_uns) / 2) with p_uns = (1 - p_sal) / N. With p_sal = 0 the
    last threshold is +inf (no salient tail).

    Args:
        sigma: a float, a 0-d tensor, or a (out, 1) tensor of per-row stds.
        p_sal: salient share in [0, 1).
        n_rings: number of inlier rings N >= 1.

    Returns:
        (N,) float32 thresholds for a scalar sigma, or (out, N) for a (out, 1) sigma.
    """
    _check_shares(p_sal, n_rings)
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32)
    if sigma_t.ndim not in (0, 2) or (sigma_t.ndim == 2 and sigma_t.shape[1] != 1):
        raise ValueError(
            f"sigma must be a scalar or a (out, 1) tensor, got shape {tuple(sigma_t.shape)}"
        )
    p_uns = (1.0 - float(p_sal)) / n_rings
    k = torch.arange(1, n_rings + 1, dtype=torch.float64, device=sigma_t.device)
    q = torch.special.ndtri((1.0 + k * p_uns) / 2.0).to(torch.float32)
    if p_sal == 0.0:
        q[-1] = float("inf")
    return sigma_t * q


def row_stats(weight: torch.Tensor, stats: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the weight, per row or for the whole layer.

    Args:
        weight: (out, in) float weight.
        stats: ``"row"`` or ``"layer"``.

    Returns:
        (mu, sigma), both (out, 1) float32 (layer statistics are broadcast to every row).
    """
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
    w = weight.to(torch.float32)
    if stats == "row":
        mu = w.mean(dim=1, keepdim=True)
        sigma = w.std(dim=1, keepdim=True, correction=0)
    else:
        mu = w.mean().reshape(1, 1).expand(w.shape[0], 1).clone()
        sigma = w.std(correction=0).reshape(1, 1).expand(w.shape[0], 1).clone()
    return mu, sigma.clamp_min(_SIGMA_FLOOR)


def saliency_score(
    weight: torch.Tensor, mu: torch.Tensor, hinv_diag: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element saliency: (w - mu)^2 / d_j^2, or |w - mu| without ``hinv_diag``.

    d_j is the diagonal of the upper Cholesky factor of H^-1 (``inverse_cholesky``), the same
    denominator GPTQ divides a column's error by; BiLLM uses w^2 / d_j^2. Centring on mu makes
    the score measure distance from the binarization centre rather than from zero.

    Args:
        weight: (out, in) weight.
        mu: (out, 1) row centres.
        hinv_diag: optional (in,) positive diagonal of the inverse-Hessian Cholesky factor.

    Returns:
        (out, in) float32 score, larger = more salient.
    """
    dev = weight.to(torch.float32) - mu
    if hinv_diag is None:
        return dev.abs()
    if hinv_diag.shape != (weight.shape[1],):
        raise ValueError(
            f"hinv_diag must have shape ({weight.shape[1]},), got {tuple(hinv_diag.shape)}"
        )
    return dev.square() / hinv_diag.to(torch.float32).square().clamp_min(1e-30)


def salient_count(p_sal: float, in_features: int) -> int:
    """Salient weights per row in ``"topk"`` mode: round(p_sal * in)."""
    return int(round(float(p_sal) * in_features))


@dataclass(frozen=True)
class Partition:
    """Result of ``partition``.

    Attributes:
        mu: (out, 1) float32 centres used for the rings.
        sigma: (out, 1) float32 spreads.
        thresholds: (out, N) float32 ring thresholds on |w - mu|.
        ring: (out, in) int8 ring index in 0..N-1 (for salient positions: the ring their
            |w - mu| falls into, clamped to N-1; not meaningful there).
        salient: (out, in) bool mask of salient weights.
        p_sal: the requested salient share.
        salient_select: ``"topk"`` or ``"threshold"``.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    thresholds: torch.Tensor
    ring: torch.Tensor
    salient: torch.Tensor
    p_sal: float
    salient_select: str

    @property
    def n_rings(self) -> int:
        return int(self.thresholds.shape[1])

    @property
    def salient_counts(self) -> torch.Tensor:
        """(out,) int64 salient weights per row."""
        return self.salient.sum(dim=1)


def partition(
    weight: torch.Tensor,
    p_sal: float,
    n_rings: int,
    stats: str = "row",
    salient_select: str = "topk",
    saliency: torch.Tensor | None = None,
    saliency_order: torch.Tensor | None = None,
) -> Partition:
    """Split a weight into N Gaussian-quantile inlier rings and a salient set.

    Args:
        weight: (out, in) float weight.
        p_sal: salient share in [0, 1).
        n_rings: inlier rings N in [1, 256].
        stats: ``"row"`` (mu, sigma per row) or ``"layer"`` (one mu, sigma for the matrix).
        salient_select: ``"topk"`` (exactly round(p_sal * in) per row) or ``"threshold"``
            (per row, as many as lie beyond t_N).
        saliency: optional (out, in) score choosing which weights of a row are salient
            (default |w - mu|).
        saliency_order: optional ``saliency_ranking(saliency)`` computed once by a caller that
            partitions one score at several shares (must come from ``saliency``).

    Returns:
        A ``Partition``.
    """
    _check_shares(p_sal, n_rings)
    if weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty (out, in) matrix, got {tuple(weight.shape)}")
    if salient_select not in SALIENT_SELECT_MODES:
        raise ValueError(
            f"salient_select must be one of {SALIENT_SELECT_MODES}, got {salient_select!r}"
        )
    if saliency is not None and saliency.shape != weight.shape:
        raise ValueError(
            f"saliency must match the weight shape {tuple(weight.shape)}, "
            f"got {tuple(saliency.shape)}"
        )
    w = weight.to(torch.float32)
    out_f, in_f = w.shape
    mu, sigma = row_stats(w, stats)
    thresholds = gaussian_thresholds(sigma, p_sal, n_rings).contiguous()
    dev = (w - mu).abs()
    idx = torch.searchsorted(thresholds, dev.contiguous(), right=False)
    if salient_select == "topk":
        counts = torch.full((out_f,), salient_count(p_sal, in_f), dtype=torch.long)
    else:
        counts = (idx >= n_rings).sum(dim=1)
    score = dev if saliency is None else saliency.to(torch.float32)
    if saliency_order is not None and saliency_order.shape != weight.shape:
        raise ValueError(
            f"saliency_order must match the weight shape {tuple(weight.shape)}, "
            f"got {tuple(saliency_order.shape)}"
        )
    order = saliency_order if saliency is not None else None
    salient = _top_per_row(score, counts.to(w.device), order)
    ring = idx.clamp_max(n_rings - 1).to(torch.int8)
    return Partition(
        mu=mu,
        sigma=sigma,
        thresholds=thresholds,
        ring=ring,
        salient=salient,
        p_sal=float(p_sal),
        salient_select=salient_select,
    )


def saliency_ranking(score: torch.Tensor) -> torch.Tensor:
    """(out, in) int64: each row's positions by descending ``score``, ties to the earlier one."""
    return score.argsort(dim=1, descending=True, stable=True)


def _top_per_row(
    score: torch.Tensor, counts: torch.Tensor, order: torch.Tensor | None = None
) -> torch.Tensor:
    """(out, in) bool mask of the ``counts[r]`` largest scores of each row r (``order``:
    ``saliency_ranking(score)`` if already computed)."""
    if order is None:
        order = saliency_ranking(score)
    rank_ok = torch.arange(score.shape[1], device=score.device).unsqueeze(0) < counts.unsqueeze(1)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, order, rank_ok)
    return mask
