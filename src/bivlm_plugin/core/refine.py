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
# Cap on floats gathered at once for the salient (k, k) blocks of H (c rows x k x k).
_GATHER_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class RefineResult:
    """Refined codes and the error before and after each iteration.

    Attributes:
        codes: the refined ``BinaryCodes``.
        errors: (iters + 1) floats, errors[0] before the first iteration (tr(R H R^T), or
            ||R||_F^2 without a Hessian).
        row_errors: (out,) float64 row errors of ``codes``, as the steps carry them (pass them
            back as ``refine(..., row_err=)`` to go on: k iterations then m more are exactly
            k + m).
    """

    codes: BinaryCodes
    errors: tuple[float, ...]
    row_errors: torch.Tensor | None = None


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
    h = None if hessian is None else hessian.to(torch.float32)
    lam = _damping(h, percdamp)
    if lam is None:
        return None
    if lam == 0.0:
        return h
    idx = torch.arange(h.shape[0], device=h.device)
    h = h.clone()
    h[idx, idx] += lam
    return h


def _damping(h: torch.Tensor | None, percdamp: float) -> float | None:
    """lambda of ``damp_hessian`` (H + lambda I, the damped system the fits solve as
    ``gram + lambda * gram0``), or None where the fits go unweighted (no H, or no positive
    diagonal)."""
    if isinstance(percdamp, bool) or not 0.0 <= float(percdamp) < 1.0:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp!r}")
    if h is None:
        return None
    mean_diag = float(torch.diagonal(h).mean())
    if not (math.isfinite(mean_diag) and mean_diag > 0.0):
        return None
    return float(percdamp) * mean_diag


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm solution of (batched) normal equations and the numerical rank of ``gram``.

    Singular systems are allowed; singular values below ``_RCOND`` of the largest count as zero.
    """
    res = torch.linalg.lstsq(gram, rhs.unsqueeze(-1), rcond=_RCOND, driver="gelsd")
    return res.solution.squeeze(-1), res.rank


@dataclass(frozen=True)
class _System:
    """Per-row normal equations of one group of parameters theta_r (P of them), float64.

    ``gram`` / ``rhs``: V_r^T H V_r and V_r^T H t_r under the metric of the error (H = I without
    a Hessian); ``gram0`` / ``rhs0``: the unweighted V_r^T V_r and V_r^T t_r. The damped system
    is ``gram + lambda * gram0`` (V^T (H + lambda I) V), and the error of any theta_r relative
    to another follows from ``gram`` and ``rhs`` alone (``_error_change``), so no step forms
    W_hat H to check its update.
    """

    gram: torch.Tensor  # (out, P, P)
    rhs: torch.Tensor  # (out, P)
    gram0: torch.Tensor
    rhs0: torch.Tensor


def _system(
    target: torch.Tensor,
    basis: torch.Tensor,
    hessian: torch.Tensor | None,
    n_dense: int,
    salient_idx: torch.Tensor,
) -> _System:
    """``_System`` of (out, in, P) ``basis`` whose columns from ``n_dense`` on are zero outside
    each row's salient positions ``salient_idx`` ((out, k), -1 pads).

    H V is formed for the dense columns only, plus H t: one (out, in) x (in, in) product each;
    the salient columns' terms are gathered from those and from the (k, k) blocks of H at each
    row's salient positions, so a 1% salient share costs far less than a dense column.
    """
    gram0 = torch.einsum("oip,oiq->opq", basis, basis).double()
    rhs0 = torch.einsum("oip,oi->op", basis, target).double()
    if hessian is None:
        return _System(gram0, rhs0, gram0, rhs0)
    out_f, in_f, p = basis.shape
    # H is symmetric: rows of H t and of H v_p are t H and v_p^T H, one GEMM each.
    rhs = torch.einsum("oip,oi->op", basis, target @ hessian).double()
    dense_t = basis[:, :, :n_dense].transpose(1, 2).contiguous()  # (out, Pd, in)
    hv = (dense_t.reshape(-1, in_f) @ hessian).reshape(out_f, n_dense, in_f)
    gram = torch.zeros(out_f, p, p, dtype=torch.float64, device=basis.device)
    gram[:, :n_dense, :n_dense] = torch.einsum("opi,oqi->opq", hv, dense_t).double()
    n_sparse, k = p - n_dense, salient_idx.shape[1]
    if n_sparse == 0 or k == 0:
        return _System(gram, rhs, gram0, rhs0)
    valid = (salient_idx >= 0).unsqueeze(2)
    idx = salient_idx.clamp(min=0)
    sparse = basis[:, :, n_dense:].gather(1, idx.unsqueeze(2).expand(-1, -1, n_sparse))
    sparse = sparse * valid  # (out, k, Ps); pads contribute nothing
    hv_s = hv.gather(2, idx.unsqueeze(1).expand(-1, n_dense, -1))  # (out, Pd, k)
    cross = torch.einsum("opk,okq->opq", hv_s, sparse).double()
    gram[:, :n_dense, n_dense:] = cross
    gram[:, n_dense:, :n_dense] = cross.transpose(1, 2)
    step = max(1, _GATHER_CHUNK_ELEMS // (k * k))
    for r0 in range(0, out_f, step):
        i, s = idx[r0 : r0 + step], sparse[r0 : r0 + step]
        h_ss = hessian[i.unsqueeze(2), i.unsqueeze(1)]  # (c, k, k) blocks of H
        gram[r0 : r0 + step, n_dense:, n_dense:] = torch.einsum(
            "ckq,ckl,clr->cqr", s, h_ss, s
        ).double()
    return _System(gram, rhs, gram0, rhs0)


def _row_constant_system(target: torch.Tensor, hessian: torch.Tensor | None) -> _System:
    """``_System`` of one parameter per row whose basis is all ones (a row mean): V^T H V is
    1^T H 1 for every row and V^T H t_r = (H 1)^T t_r, one (in,) vector for the layer."""
    out_f, in_f = target.shape
    t = target.double()
    gram0 = torch.full((out_f, 1, 1), float(in_f), dtype=torch.float64, device=target.device)
    rhs0 = t.sum(dim=1, keepdim=True)
    if hessian is None:
        return _System(gram0, rhs0, gram0, rhs0)
    h1 = hessian.double().sum(dim=1)  # H 1
    gram = h1.sum().expand(out_f, 1, 1)
    return _System(gram, (t @ h1).unsqueeze(1), gram0, rhs0)


def _solve_rows(system: _System, lam: float | None) -> torch.Tensor:
    """Per-row least squares (out, P) float64: the damped weighted system, or the unweighted one
    when ``lam`` is None. Rows whose weighted system is numerically singular where the
    unweighted one is not, or whose weighted solution is not finite, take the unweighted one."""
    sol0, rank0 = _solve(system.gram0, system.rhs0)
    if lam is None:
        return sol0
    sol, rank = _solve(system.gram + lam * system.gram0, system.rhs + lam * system.rhs0)
    bad = (rank < rank0) | ~torch.isfinite(sol).all(dim=1)
    return torch.where(bad.unsqueeze(1), sol0, sol)


def _schur_solve(
    gram: torch.Tensor, rhs: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(shared, per_row, rank of the Schur system) of ``_solve_shared``, float64."""
    gss, gsq, gqq = gram[:, :k, :k], gram[:, :k, k:], gram[:, k:, k:]
    bs, bq = rhs[:, :k], rhs[:, k:]
    gqq_pinv = torch.linalg.pinv(gqq, rtol=_RCOND, hermitian=True)
    proj = gsq @ gqq_pinv  # (out, k, q)
    schur = (gss - proj @ gsq.transpose(1, 2)).sum(dim=0)
    shared, rank = _solve(schur, (bs - (proj @ bq.unsqueeze(2)).squeeze(2)).sum(dim=0))
    per_row = (gqq_pinv @ (bq - (gsq.transpose(1, 2) @ shared)).unsqueeze(2)).squeeze(2)
    return shared, per_row, int(rank)


def _solve_shared(
    system: _System, lam: float | None, n_shared: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint least squares with the first ``n_shared`` parameters shared by all rows.

    Per row the normal equations split into blocks [[Gss, Gsq], [Gqs, Gqq]] (s shared, q per
    row). Eliminating q_r = Gqq_r^+ (bq_r - Gqs_r s) leaves the Schur system
    (sum_r Gss_r - Gsq_r Gqq_r^+ Gqs_r) s = sum_r (bs_r - Gsq_r Gqq_r^+ bq_r).
    A weighted solution that is not finite, or whose Schur system is numerically singular where
    the unweighted one is not, is replaced by the unweighted solution.

    Returns:
        (shared (n_shared,), per_row (out, P - n_shared)), float64.
    """
    shared0, per_row0, rank0 = _schur_solve(system.gram0, system.rhs0, n_shared)
    if lam is None:
        return shared0, per_row0
    shared, per_row, rank = _schur_solve(
        system.gram + lam * system.gram0, system.rhs + lam * system.rhs0, n_shared
    )
    finite = bool(torch.isfinite(shared).all()) and bool(torch.isfinite(per_row).all())
    if not finite or rank < rank0:
        return shared0, per_row0
    return shared, per_row


def _error_change(system: _System, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(out,) float64 E_r(new) - E_r(old) with E_r(theta) = ||t_r - V_r theta||^2_H, from the
    normal equations: d^T G (new + old) - 2 d^T b, d = new - old (G symmetric)."""
    d = new - old
    g_sum = (system.gram @ (new + old).unsqueeze(2)).squeeze(2)
    return (d * g_sum).sum(dim=1) - 2.0 * (d * system.rhs).sum(dim=1)


def _keep_better_rows(
    old: BinaryCodes,
    new: BinaryCodes,
    old_err: torch.Tensor,
    change: torch.Tensor,
    finite: torch.Tensor,
    shared: bool = False,
) -> tuple[BinaryCodes, torch.Tensor]:
    """``new`` where its parameters are finite (``finite``, (out,) bool) and its error change
    ``change`` does not raise the (undamped) error, else ``old``.

    Decided per row, or for the whole layer when ``shared`` (parameters shared by the rows).
    Returns the kept codes and their row errors (each row's own: a row's error depends on its
    parameters alone).
    """
    ok = finite & torch.isfinite(change)
    new_err = old_err + change
    if shared:
        if bool(ok.all()) and bool(change.sum() <= 0):
            return new, new_err
        return old, old_err
    take = ok & (change <= 0)
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
    lam = _damping(h, percdamp)
    if err is None:
        err = row_errors(w - dequantize(codes), h)
    subset, b1, b2 = _dense(codes)
    _, alpha, alpha2 = expand_params(codes)
    target = w - alpha.gather(1, subset) * b1 - alpha2 * b2
    old = codes.mu.double()
    if codes.mean_mode == "row":
        system = _row_constant_system(target, h)
        new_mu = _solve_rows(system, lam)
    else:
        basis = torch.nn.functional.one_hot(subset, codes.n_rings + 1).to(torch.float32)
        system = _system(target, basis, h, codes.n_rings, codes.salient_idx)
        present = basis.sum(dim=1) > 0
        new_mu = torch.where(present, _solve_rows(system, lam), old)
    new_mu = new_mu.to(torch.float32)
    theta = new_mu.double()
    change = _error_change(system, theta, old)
    new = replace(codes, mu=new_mu)
    return _keep_better_rows(codes, new, err, change, torch.isfinite(theta).all(dim=1))


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
    lam = _damping(h, percdamp)
    if err is None:
        err = row_errors(w - dequantize(codes), h)
    n = codes.n_rings
    out_f = w.shape[0]
    subset, b1, b2 = _dense(codes)
    mu, _, _ = expand_params(codes)
    target = w - mu.gather(1, subset)
    onehot = torch.nn.functional.one_hot(subset, n + 1).to(torch.float32)
    # Columns 0..N-1: the rings (dense); N and N+1: a1's B1 and a2's B2 on the salient weights.
    basis = torch.cat([onehot * b1.unsqueeze(2), b2.unsqueeze(2)], dim=2)  # (out, in, N + 2)
    present = basis.abs().sum(dim=1) > 0  # (out, N + 2): the subset / plane is not empty
    system = _system(target, basis, h, n, codes.salient_idx)
    old_ring = codes.alpha_ring.to(torch.float64)
    old_sal = codes.alpha_sal.to(torch.float64)
    old = torch.cat([old_ring.expand(out_f, n), old_sal], dim=1)
    if codes.scale_mode == "row_ring":
        theta = torch.where(present, _solve_rows(system, lam), old).to(torch.float32)
        new = replace(codes, alpha_ring=theta[:, :n], alpha_sal=theta[:, n:])
        shared = False
    else:
        ring, sal = _solve_shared(system, lam, n)
        ring = torch.where(present[:, :n].any(dim=0), ring, old_ring).to(torch.float32)
        sal = torch.where(present[:, n:], sal, old_sal).to(torch.float32)
        new = replace(codes, alpha_ring=ring, alpha_sal=sal)
        theta = torch.cat([ring.expand(out_f, n), sal], dim=1)
        shared = True
    theta = theta.double()
    change = _error_change(system, theta, old)
    finite = torch.isfinite(theta).all(dim=1)
    return _keep_better_rows(codes, new, err, change, finite, shared=shared)


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
    row_err: torch.Tensor | None = None,
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
        row_err: the row errors of ``codes`` under ``hessian`` when the caller has them (a
            previous ``RefineResult.row_errors``); computed otherwise.

    Returns:
        ``RefineResult`` with the error before and after every iteration (non-increasing).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    w = weight.to(torch.float32)
    h = _check_hessian(hessian, w.shape[1])
    # Row errors are carried from step to step (each step returns its codes' errors), not
    # recomputed: the mean and scale steps take their error change from their own normal
    # equations, so only the code step forms an (out, in) x (in, in) product.
    err = row_errors(w - dequantize(codes), h) if row_err is None else row_err
    errors = [float(err.sum())]
    for _ in range(iters):
        codes, err = _fit_means(w, codes, h, percdamp, err)
        codes, err = _fit_scales(w, codes, h, percdamp, err)
        if codes_step:
            codes, err = _update_codes(w, codes, h, part, assign, err)
        errors.append(float(err.sum()))
    logger.debug("refine errors: %s", errors)
    return RefineResult(codes=codes, errors=tuple(errors), row_errors=err)
