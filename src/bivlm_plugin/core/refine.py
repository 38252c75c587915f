"""Alternating refinement of means, scales and codes (ARB-LLM, arXiv 2410.03129), plain or
calibration-weighted (ARB-X).

The objective per layer is E = sum_r (w_r - w_hat_r)^T H (w_r - w_hat_r) = tr(R H R^T), with
H = I for the plain variant (then E = ||R||_F^2). Given the codes (signs, rings, salient planes),
w_hat is linear in the continuous parameters:

    w_hat_r = sum_p theta_rp * v_rp,   v_rp = indicator of subset s (for a mean mu_s),
                                        v_rp = B * indicator of ring k (for a scale alpha_k),
                                        v_rp = B2 (for the salient a2).

Setting the gradient of E to zero for a group of parameters theta_r (others fixed, target
t_r = w_r minus the fixed part of w_hat_r) gives the closed form (normal equations)

    (V_r^T H V_r) theta_r = V_r^T H t_r.

For H = I and one mean per row this is mu = mean(w - alpha B) (ARB's mean update); for one
scale per ring it is alpha_k = mean over ring k of B * (w - mu), which is mean |w - mu| when
B = sign(w - mu). Parameters shared by all rows (``scale_mode="ring"``) sum the normal equations
over rows. Each step minimizes E exactly over its group, so E never increases. The code step picks
the nearest level per element (exact for H = I); under a general H it is kept for a row only
when it does not raise that row's error, which preserves monotonicity.

Numerical safeguards (calibration Hessians of LayerNorm-ed inputs, or of fewer tokens than
features, are rank-deficient and may have dead inputs with a zero diagonal): the weighted systems
can be solved against H + lambda I with lambda = percdamp * mean(diag H) (``percdamp``, the damping
GPTQ's compensation uses); singular values below ``_RCOND`` of the largest are truncated (the
normal equations are built in float32); rows whose weighted system is numerically singular where
the unweighted one is not take the unweighted (H = I) closed form; parameters of empty subsets keep
their previous value; and a parameter update is kept (per row, or for the whole layer when
parameters are shared) only when it is finite and does not raise the undamped error
tr(R H R^T). Without damping and with a well-conditioned H the fits are the exact minimizers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

from .binarize import (
    BinaryCodes,
    dense_sign2,
    dequantize,
    expand_params,
    grid_from_codes,
    pack_codes,
    quantize_with_grid,
    salient_mask,
    subset_index,
)
from .partition import Partition

__all__ = [
    "RefineResult",
    "damp_hessian",
    "fit_means",
    "fit_scales",
    "layer_error",
    "refine",
    "refit",
    "row_errors",
    "update_codes",
]

logger = logging.getLogger(__name__)

# Relative singular-value cut of the float64 solves: the normal equations are accumulated in
# float32, so directions below about 1e-6 of the largest are rounding noise, and solving for them
# gives huge, cancelling parameters (non-finite once rounded to fp16).
_RCOND = 1e-6


@dataclass(frozen=True)
class RefineResult:
    """Refined codes and the error before and after each iteration.

    Attributes:
        codes: the refined ``BinaryCodes``.
        errors: (iters + 1) floats, errors[0] before the first iteration (tr(R H R^T), or
            ||R||_F^2 without a Hessian).
    """

    codes: BinaryCodes
    errors: tuple[float, ...]


def _check_hessian(hessian: torch.Tensor | None, in_f: int) -> torch.Tensor | None:
    if hessian is None:
        return None
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(
            f"hessian must be (in, in) = ({in_f}, {in_f}) for this weight, "
            f"got {tuple(hessian.shape)}"
        )
    return hessian.to(torch.float32)


def row_errors(residual: torch.Tensor, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """(out,) float64 per-row error r^T H r (or ||r||^2) of an (out, in) residual."""
    r = residual.to(torch.float32)
    if hessian is None:
        return r.double().square().sum(dim=1)
    return ((r @ hessian.to(torch.float32)).double() * r.double()).sum(dim=1)


def layer_error(
    weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None = None
) -> float:
    """tr(R H R^T) with R = W - W_hat, or ||R||_F^2 without a Hessian."""
    return float(row_errors(weight.to(torch.float32) - w_hat.to(torch.float32), hessian).sum())


def _dense(codes: BinaryCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(subset int64, b1 float +-1, b2 float +-1 at salient positions else 0), all (out, in)."""
    sal = salient_mask(codes)
    b1 = codes.signs.to(torch.float32) * 2.0 - 1.0
    b2 = torch.where(sal, dense_sign2(codes).to(torch.float32) * 2.0 - 1.0, 0.0)
    return subset_index(codes), b1, b2


def damp_hessian(hessian: torch.Tensor | None, percdamp: float = 0.0) -> torch.Tensor | None:
    """The metric the weighted fits solve against: H + lambda I, lambda = percdamp * mean(diag H).

    The damping rule of ``hessian.inverse_cholesky`` (GPTQ); it keeps the weighted normal
    equations well conditioned when H is rank-deficient or has dead (zero-diagonal) inputs.

    Args:
        hessian: (in, in) H, or None.
        percdamp: damping as a share of the mean diagonal, in [0, 1).

    Returns:
        float32 damped H, or None when H is None or has no positive diagonal (an all-zero H
        weights nothing; the fits then use the unweighted closed forms).
    """
    if isinstance(percdamp, bool) or not 0.0 <= float(percdamp) < 1.0:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")
    if hessian is None:
        return None
    h = hessian.to(torch.float32)
    mean_diag = float(torch.diagonal(h).mean())
    if not (math.isfinite(mean_diag) and mean_diag > 0.0):
        return None
    if percdamp == 0.0:
        return h
    idx = torch.arange(h.shape[0], device=h.device)
    h = h.clone()
    h[idx, idx] += float(percdamp) * mean_diag
    return h


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm solution of (batched) normal equations and the numerical rank of ``gram``.

    Singular systems are allowed; singular values below ``_RCOND`` of the largest count as zero.
    """
    res = torch.linalg.lstsq(gram, rhs.unsqueeze(-1), rcond=_RCOND, driver="gelsd")
    return res.solution.squeeze(-1), res.rank


def _normal_terms(
    target: torch.Tensor, basis: torch.Tensor, hessian: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row V^T H V (out, P, P) and V^T H t (out, P), float64."""
    hv = basis if hessian is None else torch.einsum("ij,ojp->oip", hessian, basis)
    gram = torch.einsum("oip,oiq->opq", basis, hv).double()
    rhs = torch.einsum("oip,oi->op", hv, target).double()
    return gram, rhs


def _row_lstsq(
    target: torch.Tensor, basis: torch.Tensor, hessian: torch.Tensor | None
) -> torch.Tensor:
    """argmin_theta (t_r - V_r theta_r)^T H (t_r - V_r theta_r) for every row; (out, P).

    Rows whose weighted system is numerically singular where the unweighted one is not, or whose
    weighted solution is not finite, take the unweighted solution.
    """
    sol, rank = _solve(*_normal_terms(target, basis, hessian))
    if hessian is not None:
        sol0, rank0 = _solve(*_normal_terms(target, basis, None))
        bad = (rank < rank0) | ~torch.isfinite(sol).all(dim=1)
        sol = torch.where(bad.unsqueeze(1), sol0, sol)
    return sol.to(torch.float32)


def _schur_solve(
    gram: torch.Tensor, rhs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(shared, per_row, rank of the Schur system) of ``_shared_and_row_lstsq``, float64."""
    gss, gsq, gqq = gram[:, :k, :k], gram[:, :k, k:], gram[:, k:, k:]
    bs, bq = rhs[:, :k], rhs[:, k:]
    gqq_pinv = torch.linalg.pinv(gqq, rtol=_RCOND, hermitian=True)
    proj = gsq @ gqq_pinv  # (out, k, q)
    schur = (gss - proj @ gsq.transpose(1, 2)).sum(dim=0)
    shared, rank = _solve(schur, (bs - (proj @ bq.unsqueeze(2)).squeeze(2)).sum(dim=0))
    per_row = (gqq_pinv @ (bq - (gsq.transpose(1, 2) @ shared)).unsqueeze(2)).squeeze(2)
    return shared, per_row, int(rank)


def _shared_and_row_lstsq(
    target: torch.Tensor, basis: torch.Tensor, n_shared: int, hessian: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint least squares with the first ``n_shared`` parameters shared by all rows.

    Per row the normal equations split into blocks [[Gss, Gsq], [Gqs, Gqq]] (s shared, q per
    row). Eliminating q_r = Gqq_r^+ (bq_r - Gqs_r s) leaves the Schur system
    (sum_r Gss_r - Gsq_r Gqq_r^+ Gqs_r) s = sum_r (bs_r - Gsq_r Gqq_r^+ bq_r).
    A weighted solution that is not finite, or whose Schur system is numerically singular where
    the unweighted one is not, is replaced by the unweighted solution.

    Returns:
        (shared (n_shared,), per_row (out, P - n_shared)), float32.
    """
    shared, per_row, rank = _schur_solve(*_normal_terms(target, basis, hessian), n_shared)
    if hessian is not None:
        finite = bool(torch.isfinite(shared).all()) and bool(torch.isfinite(per_row).all())
        shared0, per_row0, rank0 = _schur_solve(*_normal_terms(target, basis, None), n_shared)
        if not finite or rank < rank0:
            shared, per_row = shared0, per_row0
    return shared.to(torch.float32), per_row.to(torch.float32)


def _keep_better_rows(
    weight: torch.Tensor,
    old: BinaryCodes,
    new: BinaryCodes,
    hessian: torch.Tensor | None,
    shared: bool = False,
    old_err: torch.Tensor | None = None,
) -> tuple[BinaryCodes, torch.Tensor]:
    """``new`` where it is finite and does not raise the (undamped) error, else ``old``.

    Decided per row, or for the whole layer when ``shared`` (parameters shared by the rows).
    ``old_err``: ``old``'s row errors when the caller has them. Returns the kept codes and
    their row errors (each row's own: a row's error depends on its parameters alone).
    """
    if old_err is None:
        old_err = row_errors(weight - dequantize(old), hessian)
    new_err = row_errors(weight - dequantize(new), hessian)
    if shared:
        # NaN compares False: a non-finite update is never taken.
        return (new, new_err) if bool(new_err.sum() <= old_err.sum()) else (old, old_err)
    take = new_err <= old_err
    if bool(take.all()):
        return new, new_err
    fields = {}
    for name in ("mu", "alpha_ring", "alpha_sal"):
        a, b = getattr(old, name), getattr(new, name)
        fields[name] = torch.where(take.unsqueeze(1), b, a) if b.ndim == 2 else b
    return replace(new, **fields), torch.where(take, new_err, old_err)


def fit_means(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None = None,
    percdamp: float = 0.0,
) -> BinaryCodes:
    """Minimization of the error over the means, codes and scales fixed.

    Args:
        weight: (out, in) target weight.
        codes: current codes.
        hessian: optional (in, in) H (ARB-X); None for the plain Frobenius error.
        percdamp: solve against H + percdamp * mean(diag H) * I (``damp_hessian``); 0 gives
            the exact minimizer when H is well conditioned.

    Returns:
        ``codes`` with new ``mu`` (empty subsets keep their previous mean; a row keeps its old
        means when the new ones are not finite or would raise its error).
    """
    return _fit_means(weight, codes, hessian, percdamp)[0]


def _fit_means(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None,
    percdamp: float,
    err: torch.Tensor | None = None,
) -> tuple[BinaryCodes, torch.Tensor]:
    """``fit_means`` given (optionally) the codes' row errors; returns the new ones too."""
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    h_solve = damp_hessian(h, percdamp)
    subset, b1, b2 = _dense(codes)
    mu, alpha, alpha2 = expand_params(codes)
    target = w - alpha.gather(1, subset) * b1 - alpha2 * b2
    if codes.mean_mode == "row":
        if h_solve is None:
            new = replace(codes, mu=target.mean(dim=1, keepdim=True))
        else:
            basis = torch.ones_like(target).unsqueeze(2)
            new = replace(codes, mu=_row_lstsq(target, basis, h_solve))
    else:
        n_sub = codes.n_rings + 1
        basis = torch.nn.functional.one_hot(subset, n_sub).to(torch.float32)
        new_mu = _row_lstsq(target, basis, h_solve)
        present = basis.sum(dim=1) > 0
        new = replace(codes, mu=torch.where(present, new_mu, codes.mu))
    return _keep_better_rows(w, codes, new, h, old_err=err)


def fit_scales(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None = None,
    percdamp: float = 0.0,
) -> BinaryCodes:
    """Minimization of the error over the scales (ring alphas, a1, a2), the rest fixed.

    With ``scale_mode="ring"`` the shared ring scales and the per-row salient scales are solved
    jointly through a Schur complement; with ``"row_ring"`` jointly per row.

    Args:
        weight: (out, in) target weight.
        codes: current codes.
        hessian: optional (in, in) H (ARB-X); None for the plain Frobenius error.
        percdamp: solve against H + percdamp * mean(diag H) * I (``damp_hessian``); 0 gives
            the exact minimizer when H is well conditioned.

    Returns:
        ``codes`` with new ``alpha_ring`` and ``alpha_sal`` (scales of empty subsets keep their
        previous value; an update that is not finite or would raise the error is not taken).
    """
    return _fit_scales(weight, codes, hessian, percdamp)[0]


def _fit_scales(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None,
    percdamp: float,
    err: torch.Tensor | None = None,
) -> tuple[BinaryCodes, torch.Tensor]:
    """``fit_scales`` given (optionally) the codes' row errors; returns the new ones too."""
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    h_solve = damp_hessian(h, percdamp)
    n = codes.n_rings
    subset, b1, b2 = _dense(codes)
    mu, _, _ = expand_params(codes)
    target = w - mu.gather(1, subset)
    onehot = torch.nn.functional.one_hot(subset, n + 1).to(torch.float32)
    basis = torch.cat([onehot * b1.unsqueeze(2), b2.unsqueeze(2)], dim=2)  # (out, in, N + 2)
    present = basis.abs().sum(dim=1) > 0  # (out, N + 2): the subset / plane is not empty
    old_sal = codes.alpha_sal.to(torch.float32)
    if codes.scale_mode == "row_ring":
        theta = _row_lstsq(target, basis, h_solve)
        old = torch.cat([codes.alpha_ring.to(torch.float32), old_sal], dim=1)
        theta = torch.where(present, theta, old)
        new = replace(codes, alpha_ring=theta[:, :n], alpha_sal=theta[:, n:])
        return _keep_better_rows(w, codes, new, h, old_err=err)
    shared, alpha_sal = _shared_and_row_lstsq(target, basis, n, h_solve)
    shared = torch.where(present[:, :n].any(dim=0), shared, codes.alpha_ring.to(torch.float32))
    alpha_sal = torch.where(present[:, n:], alpha_sal, old_sal)
    new = replace(codes, alpha_ring=shared, alpha_sal=alpha_sal)
    return _keep_better_rows(w, codes, new, h, shared=True, old_err=err)


def update_codes(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None = None,
    part: Partition | None = None,
    assign: str = "nearest",
) -> BinaryCodes:
    """Re-pick signs, rings and second-plane signs for fixed parameters and salient positions.

    A row takes its new codes only when they do not raise its error (always the case for
    ``assign="nearest"`` without a Hessian).

    Args:
        weight: (out, in) target weight.
        codes: current codes.
        hessian: optional (in, in) H.
        part: partition, needed for ``assign="threshold"``.
        assign: ``"nearest"`` or ``"threshold"``.
    """
    return _update_codes(weight, codes, hessian, part, assign)[0]


def _update_codes(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None,
    part: Partition | None,
    assign: str,
    err: torch.Tensor | None = None,
) -> tuple[BinaryCodes, torch.Tensor]:
    """``update_codes`` given (optionally) the codes' row errors; returns the new ones too."""
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    grid = grid_from_codes(codes, part, assign)
    cand = quantize_with_grid(w, grid, slice(None))
    old_err = row_errors(w - dequantize(codes), h) if err is None else err
    new_err = row_errors(w - cand.w_hat, h)
    keep = new_err <= old_err
    take = keep.unsqueeze(1)
    signs = torch.where(take, cand.signs, codes.signs)
    ring = torch.where(take, cand.ring, codes.ring)
    sign2 = torch.where(take, cand.sign2, dense_sign2(codes))
    new = pack_codes(signs, ring, grid.salient, sign2, codes.alpha_ring, codes.alpha_sal, codes.mu)
    return new, torch.where(keep, new_err, old_err)


def refit(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None = None,
    iters: int = 2,
    percdamp: float = 0.0,
) -> BinaryCodes:
    """Alternate ``fit_means`` and ``fit_scales`` ``iters`` times, codes kept."""
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    err = None
    for _ in range(iters):
        codes, err = _fit_means(w, codes, h, percdamp, err)
        codes, err = _fit_scales(w, codes, h, percdamp, err)
    return codes


def refine(
    weight: torch.Tensor,
    codes: BinaryCodes,
    hessian: torch.Tensor | None = None,
    iters: int = 3,
    codes_step: bool = True,
    part: Partition | None = None,
    assign: str = "nearest",
    percdamp: float = 0.0,
) -> RefineResult:
    """ARB alternating refinement: mean step, scale step, code step, ``iters`` times.

    Args:
        weight: (out, in) target weight.
        codes: initial codes (from ``encode``).
        hessian: optional (in, in) H: ARB-X, minimizes tr(R H R^T); None: ||R||_F^2.
        iters: number of iterations (>= 0).
        codes_step: re-pick codes each iteration (False keeps the codes: parameters only).
        part: partition, needed for ``assign="threshold"``.
        assign: code step rule, ``"nearest"`` or ``"threshold"``.
        percdamp: damping of H in the mean / scale solves (``damp_hessian``); the reported and
            guarded error is always the undamped tr(R H R^T).

    Returns:
        ``RefineResult`` with the error before and after every iteration (non-increasing).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    # Row errors are carried from step to step (each step returns its codes' errors), not
    # recomputed: the same figures, about half the (out, in) x (in, in) products.
    err = row_errors(w - dequantize(codes), h)
    errors = [float(err.sum())]
    for _ in range(iters):
        codes, err = _fit_means(w, codes, h, percdamp, err)
        codes, err = _fit_scales(w, codes, h, percdamp, err)
        if codes_step:
            codes, err = _update_codes(w, codes, h, part, assign, err)
        errors.append(float(err.sum()))
    logger.debug("refine errors: %s", errors)
    return RefineResult(codes=codes, errors=tuple(errors))
