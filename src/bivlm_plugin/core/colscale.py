"""Per-input-column scales: W ~ Q diag(c), with Q binarized row-wise (ARB-RC's column scales).

Two uses share this math:

* ``BiVLMConfig.col_scale``: each layer stores its own c (one fp16 per input column, counted in
  storage bits).
* folding (``BiVLMModifier.fold_scales``): one c shared by the layers that read the same input
  (q / k / v after a norm, gate / up, down after up), folded into the layer that produces that
  input: the norm's weight, or the rows of the producing linear. Then nothing is stored: the
  model computes ``Q (c * x)`` because its input already is ``c * x``.

All functions are pure torch on float32 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fold_norm_weight", "initial_col_scale", "solve_col_scale", "tie_scale"]


def initial_col_scale(w: torch.Tensor, fp16: bool = False) -> torch.Tensor:
    """(in,) column scales of an (out, in) weight: each column's mean |w - mu_row| / sd_row.

    Normalized to geometric mean 1; all-zero (dead) columns get 1% of the median. Stack the
    rows of several layers (``torch.cat(ws)``) for the scale they share.

    Args:
        w: (out, in) float weight.
        fp16: round the scales to fp16 values (kept as float32), as they will be stored.
    """
    w = w.to(torch.float32)
    mu = w.mean(dim=1, keepdim=True)
    sd = w.std(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    c = ((w - mu) / sd).abs().mean(dim=0)
    floor = max(float(c.median()) * 1e-2, 1e-6)
    c = c.clamp_min(floor)
    c = c / c.log().mean().exp()
    return c.half().float() if fp16 else c


def tie_scale(c: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """(n_free,) scales for tied columns: the geometric mean of the columns of each parameter.

    Args:
        c: (in,) positive column scales.
        tie: (in,) int64 index of the free parameter each column takes (grouped-query
            attention: o_proj's columns of the query heads that share a value head).
    """
    n = int(tie.max()) + 1
    logs = torch.zeros(n, dtype=torch.float32, device=c.device).index_add_(0, tie, c.log())
    counts = torch.zeros(n, dtype=torch.float32, device=c.device).index_add_(
        0, tie, torch.ones_like(c)
    )
    return (logs / counts.clamp_min(1)).exp()


def solve_col_scale(
    targets: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    hessians: Sequence[torch.Tensor | None],
    c0: torch.Tensor,
    percdamp: float,
    tie: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares (in,) c for W_l ~ Q_l diag(c), summed over layers l, damped toward ``c0``.

    Minimizes sum_l tr((W_l - Q_l D) H_l (W_l - Q_l D)^T); setting the gradient to 0 gives
    (sum_l H_l * Q_l^T Q_l) c = sum_l diag(Q_l^T W_l H_l). The damping adds lam * (c - c0) with
    lam = max(percdamp, 1e-6) times the mean diagonal (calibration Hessians are often
    rank-deficient). A Hessian of None is the identity.

    Args:
        targets: (out_l, in) weights W_l.
        codes: (out_l, in) dequantized row codes Q_l (without column scales).
        hessians: (in, in) H_l or None, one per layer.
        c0: (in,) the scales the codes were chosen under.
        percdamp: damping fraction (the layer's GPTQ dampening).
        tie: optional (in,) int64 free-parameter index of each column (``tie_scale``); the
            solve is then over the free parameters, c = c_free[tie] (``c0`` must be tied).

    Returns:
        (in,) c (with ``tie``: expanded from the free parameters).
    """
    if not (len(targets) == len(codes) == len(hessians)) or not targets:
        raise ValueError(
            f"solve_col_scale needs one code and one Hessian per target, got {len(targets)} "
            f"targets, {len(codes)} codes, {len(hessians)} Hessians"
        )
    n = c0.numel()
    m = torch.zeros(n, n, dtype=torch.float32, device=c0.device)
    rhs = torch.zeros(n, dtype=torch.float32, device=c0.device)
    for w, q, h in zip(targets, codes, hessians, strict=True):
        w, q = w.to(torch.float32), q.to(torch.float32)
        if h is None:
            m.diagonal().add_((q * q).sum(dim=0))
            rhs += (q * w).sum(dim=0)
        else:
            h = h.to(torch.float32)
            m += h * (q.T @ q)
            rhs += (q * (w @ h)).sum(dim=0)
    c0 = c0.to(torch.float32)
    if tie is not None:  # c = E c_free: solve E^T M E c_free = E^T rhs
        k = int(tie.max()) + 1
        m = torch.zeros(k, n, dtype=m.dtype, device=m.device).index_add_(0, tie, m)
        m = torch.zeros(k, k, dtype=m.dtype, device=m.device).index_add_(1, tie, m)
        rhs = torch.zeros(k, dtype=rhs.dtype, device=rhs.device).index_add_(0, tie, rhs)
        c0 = torch.zeros(k, dtype=c0.dtype, device=c0.device).index_copy_(0, tie, c0)
    lam = max(percdamp, 1e-6) * float(torch.diagonal(m).mean())
    m.diagonal().add_(lam)
    c = torch.linalg.solve(m, rhs + lam * c0)
    return c if tie is None else c[tie]


def fold_norm_weight(weight: torch.Tensor, scale: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm weight whose output is ``scale`` times the old one's.

    Norms compute ``n(x) * (offset + weight)``: offset 0 (LLaMA's RMSNorm, LayerNorm) or 1
    (Gemma's RMSNorm); the folded weight is ``(offset + weight) * scale - offset``, in float32.
    """
    return (offset + weight.to(torch.float32)) * scale.to(torch.float32) - offset
