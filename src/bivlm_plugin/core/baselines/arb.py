"""ARB-LLM (Li et al., arXiv 2410.03129, ICLR 2025): ARB-X and ARB-RC, from the authors' code.

Source: github.com/ZHITENGLI/ARB-LLM at 8512765: ``binary_arb.py`` (the refinements:
``high_order_residual_alternating_order1`` / ``_mean`` and their ``_x`` variants,
``high_order_residual_alternating_order1_rc_nomean`` / ``order2_rc_nomean``),
``utils/autosearch_arb.py``
(``structural_searching_multip_alternating_group_x`` / ``_rc``: the searches),
``utils/structure_arb.py`` (the metric) and ``bigptq_arb.py`` (the block loop, which is BiLLM's).
``run_arb.py`` defaults: ``--blocksize 128 --num_p 1``, 128 calibration samples, 15 refinement
iterations (``iter=15``) and 15 calibration-aware iterations (``iter2=15``) in ``binary_arb.py``.

ARB-LLM keeps BiLLM's pipeline (``billm.py``: Hessian metric, structural salient-column search,
bell-shaped break-point split, block-wise compensation) and replaces how each group is binarized:

* **ARB** (alternating refined binarization): start from BiLLM's residual binarization, then for
  15 iterations update the row mean mu (by the mean residual), the row scale alpha (least squares
  for fixed signs) and the signs B (sign(w - mu); for two planes the nearest of the four levels
  mu +- alpha1 +- alpha2).
* **ARB-X** (registered ``arb_x``): after ARB, 15 more updates of mu and alpha (B fixed) that
  minimize the calibration-weighted error (w - w_hat) S (w - w_hat)^T with S = X_b^T X_b, the
  block of the calibration Gram matrix; here S is the block of the given Hessian (H = 2 X^T X / n
  is S up to a constant, which these ratios ignore). The non-salient break point is scored with
  the same S-weighted error.
* **ARB-RC** (registered ``arb_rc``): no mean; w_hat = alpha_r (row) * alpha_c (column) * B, both
  scales refined alternately for 15 iterations; for two planes B1, B2 are re-chosen among the
  four levels +-c1 +-c2 with c_k = alpha_r,k alpha_c,k^T.
* **CGB** (column-group bitmap, ``column_group_bitmap=True``; the code's ``--order2_group``): the
  salient columns are split by a second break point (percentiles over the nonzero salient
  entries, scored with order-2 BiLLM binarization) into a sparse and a concentrated group, each
  with its own order-2 parameters, so the group bitmap covers every weight. The paper's headline
  ARB-LLM_X and ARB-LLM_RC are ARB-X / ARB-RC + CGB: the default here, while ``run_arb.py``
  defaults the flag off.

Faithfulness notes (see also ``billm.py``):
    * ``salient_metric`` defaults to ``"hessian"``, BiLLM's published setting (``run_arb.py``
      defaults to ``"magnitude"`` and the repository ships no run script).
    * Searches run on the metric matrix (``search_on="metric"``) as in the code.
    * Only ``num_p=1`` (two non-salient groups, the default and the paper's setting) is ported.
    * The salient search and the CGB split are scored with plain MSE, the non-salient split with
      MSE (ARB-RC) or the S-weighted error (ARB-X), exactly as in ``autosearch_arb.py``; the
      fixed salient approximation during the non-salient split is ARB's (X) or ARB-RC's order-2
      refinement of the whole salient set.

Storage layout counted (DESIGN.md section 2), per block of b columns, out rows, s salient columns,
g_s salient groups (2 with CGB, 1 without, 0 when s = 0) and 2 non-salient groups:
    * ``sign_plane`` out * b, ``salient_residual_plane`` out * s bits;
    * ``salient_column_bitmap`` b bits;
    * ``group_bitmap`` out * b bits with CGB (every weight), out * (b - s) without;
    * ARB-X: ``row_scale`` fp16 per row for each plane of each group (2 g_s + 2) and ``row_mean``
      one folded fp16 mean per row per group (g_s + 2): 10 fp16 per row per block with CGB,
      1.25 bits per weight at b = 128;
    * ARB-RC: ``row_scale`` (2 g_s + 2 per row, 6 with CGB: 0.75 bits per weight) and
      ``column_scale``: one fp16 per plane per group for each column the group touches.
The paper reports ~1.1 bits (its weight bits: planes only). Measured on seeded Laplacian
weights, out = 576, weight / storage bits: ARB-X + CGB 1.153 / 3.543 at in = 576 and
1.193 / 3.444 at in = 1536 (without CGB 2.974 / 2.877, BiLLM's layout); ARB-RC + CGB
1.142 / 3.041 at in = 576 and 1.193 / 3.011 at in = 1536.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from bivlm_plugin.core.baselines._common import (
    FP16_BITS,
    check_hessian,
    check_weight,
    masked_mean,
    safe_div,
    sign_pm,
)
from bivlm_plugin.core.baselines.billm import (
    StructuredSearchConfig,
    blockwise_result,
    mse_error,
    salient_search_inputs,
    search_break_point,
    search_salient_columns,
)
from bivlm_plugin.core.types import QuantResult, register_method

__all__ = [
    "ArbXConfig",
    "ArbRcConfig",
    "arb_order1",
    "arb_order2",
    "arb_x_order1",
    "arb_x_order2",
    "arb_rc_order1",
    "arb_rc_order2",
    "quantize_arb_x",
    "quantize_arb_rc",
]

logger = logging.getLogger(__name__)

_X_EPS = 1e-10  # the code's denominator guard in the calibration-aware updates


def _check_arb_fields(cfg: StructuredSearchConfig, iterations: int, cgb: bool, num_p: int) -> None:
    name = type(cfg).__name__
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"{name}.iterations must be an int >= 0, got {iterations!r}")
    if not isinstance(cgb, bool):
        raise ValueError(f"{name}.column_group_bitmap must be a bool, got {cgb!r}")
    if num_p != 1:
        raise ValueError(
            f"{name}.num_p={num_p!r} is not supported: only num_p=1 (two non-salient groups, "
            "the default of run_arb.py and the paper) is ported"
        )


@dataclass(frozen=True)
class ArbXConfig(StructuredSearchConfig):
    """Config of ``arb_x`` (ARB-LLM_X); search knobs as in ``StructuredSearchConfig``.

    Attributes:
        iterations: ARB alternating iterations (``iter`` / ``num_iters``, 15).
        x_iterations: calibration-aware mu / alpha iterations (``iter2``, 15).
        column_group_bitmap: CGB: split the salient columns into two groups too.
        num_p: non-salient splits (only 1 is supported).
    """

    iterations: int = 15
    x_iterations: int = 15
    column_group_bitmap: bool = True
    num_p: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_arb_fields(self, self.iterations, self.column_group_bitmap, self.num_p)
        if not isinstance(self.x_iterations, int) or self.x_iterations < 0:
            raise ValueError(
                f"ArbXConfig.x_iterations must be an int >= 0, got {self.x_iterations!r}"
            )

    @property
    def needs_hessian(self) -> bool:
        return True  # S, the calibration Gram block, is the point of ARB-X


@dataclass(frozen=True)
class ArbRcConfig(StructuredSearchConfig):
    """Config of ``arb_rc`` (ARB-LLM_RC); search knobs as in ``StructuredSearchConfig``.

    Attributes:
        iterations: alternating row / column scale iterations (``iter``, 15).
        column_group_bitmap: CGB: split the salient columns into two groups too.
        num_p: non-salient splits (only 1 is supported).
    """

    iterations: int = 15
    column_group_bitmap: bool = True
    num_p: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_arb_fields(self, self.iterations, self.column_group_bitmap, self.num_p)


# --- ARB: alternating refinement with a row mean (binary_arb.py) ------------------------------


def _init_residual(
    new: torch.Tensor, mask: torch.Tensor, order: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """BiLLM's residual start: (approx, folded mean (out,), alphas [(out,)], signs [(out, b)])."""
    m = mask.to(new.dtype)
    approx = torch.zeros_like(new)
    mu_total = torch.zeros_like(new[:, 0])
    alphas, signs = [], []
    for _ in range(order):
        res = new - approx
        mu = masked_mean(res, mask, -1)
        centred = res - mu[:, None]
        alpha = masked_mean(centred.abs(), mask, -1)
        b = sign_pm(centred) * m
        approx = approx + (alpha[:, None] * b + mu[:, None]) * m
        mu_total = mu_total + mu
        alphas.append(alpha)
        signs.append(b)
    return approx, mu_total, alphas, signs


def arb_order1(
    w: torch.Tensor, mask: torch.Tensor, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ARB on one plane (``high_order_residual_alternating_order1``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        iterations: alternating updates of mu, alpha, B.

    Returns:
        (approx (out, b) zero outside the mask, mu (out,), alpha (out,), B (out, b) in {-1, 0, +1},
        0 outside the mask).
    """
    m = mask.to(w.dtype)
    new = w * m
    approx, mu, (alpha,), (b,) = _init_residual(new, mask, 1)
    for _ in range(iterations):
        mu = mu + masked_mean(new - approx, mask, -1)
        alpha = safe_div((b * (new - mu[:, None] * m)).sum(-1), b.pow(2).sum(-1))
        b = sign_pm(new - mu[:, None]) * m
        approx = (alpha[:, None] * b + mu[:, None]) * m
    return approx, mu, alpha, b


def _nearest_two_plane(
    target: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (B1, B2) whose level B1 c1 + B2 c2 is nearest ``target`` (the code's argmin step).

    ``c1`` and ``c2`` broadcast to ``target``'s shape; levels in the code's order
    (-c1-c2, -c1+c2, c1-c2, c1+c2), first minimum on ties.
    """
    levels = torch.stack([-c1 - c2, -c1 + c2, c1 - c2, c1 + c2], dim=-1)
    idx = torch.argmin((target.unsqueeze(-1) - levels).abs(), dim=-1)
    b1 = torch.where(idx >= 2, 1.0, -1.0).to(target.dtype)
    b2 = torch.where(idx % 2 == 1, 1.0, -1.0).to(target.dtype)
    return b1, b2


def arb_order2(
    w: torch.Tensor, mask: torch.Tensor, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """ARB on two residual planes with one folded mean (``high_order_residual_alternating_mean``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        iterations: alternating updates of mu, (alpha1, alpha2), (B1, B2).

    Returns:
        (approx (out, b), mu (out,), [alpha1, alpha2] (out,) each, [B1, B2] (out, b) each).
    """
    m = mask.to(w.dtype)
    new = w * m
    approx, mu, alphas, signs = _init_residual(new, mask, 2)
    for _ in range(iterations):
        mu = mu + masked_mean(new - approx, mask, -1)
        centred = new - mu[:, None] * m
        alphas[0] = safe_div(
            (signs[0] * (centred - alphas[1][:, None] * signs[1])).sum(-1), signs[0].pow(2).sum(-1)
        )
        alphas[1] = safe_div(
            (signs[1] * (centred - alphas[0][:, None] * signs[0])).sum(-1), signs[1].pow(2).sum(-1)
        )
        b1, b2 = _nearest_two_plane(centred, alphas[0][:, None], alphas[1][:, None])
        signs = [b1 * m, b2 * m]
        approx = (alphas[0][:, None] * signs[0] + alphas[1][:, None] * signs[1] + mu[:, None]) * m
    return approx, mu, alphas, signs


# --- ARB-X: calibration-aware mu / alpha (binary_arb.py, *_x) ---------------------------------


def _quad(a: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row-wise a_r^T S c_r for (out, b) a, c and (b, b) symmetric S -> (out,)."""
    return ((a @ s) * c).sum(-1)


def arb_x_order1(
    w: torch.Tensor,
    mask: torch.Tensor,
    s: torch.Tensor,
    iterations: int = 15,
    x_iterations: int = 15,
) -> torch.Tensor:
    """ARB-X on one plane (``high_order_residual_alternating_order1_x``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        s: (b, b) calibration Gram block (any positive multiple of X_b^T X_b).
        iterations: ARB iterations first.
        x_iterations: then mu / alpha updates minimizing (w - w_hat) S (w - w_hat)^T, B fixed.

    Returns:
        (out, b) approximation, zero outside the mask.
    """
    m = mask.to(w.dtype)
    new = w * m
    _, mu, alpha, b = arb_order1(w, mask, iterations)
    den_mu = _quad(m, s, m) + _X_EPS
    den_a = _quad(b, s, b) + _X_EPS
    for _ in range(x_iterations):
        mu = _quad(new - alpha[:, None] * b, s, m) / den_mu
        alpha = _quad(b, s, new - mu[:, None] * m) / den_a
    return (alpha[:, None] * b + mu[:, None]) * m


def arb_x_order2(
    w: torch.Tensor,
    mask: torch.Tensor,
    s: torch.Tensor,
    iterations: int = 15,
    x_iterations: int = 15,
) -> torch.Tensor:
    """ARB-X on two residual planes (``high_order_residual_alternating_mean_x``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        s: (b, b) calibration Gram block.
        iterations: ARB iterations first.
        x_iterations: then calibration-aware updates of mu, alpha1, alpha2 (B1, B2 fixed).

    Returns:
        (out, b) approximation, zero outside the mask.
    """
    m = mask.to(w.dtype)
    new = w * m
    _, mu, (a1, a2), (b1, b2) = arb_order2(w, mask, iterations)
    den_mu = _quad(m, s, m) + _X_EPS
    den_1 = _quad(b1, s, b1) + _X_EPS
    den_2 = _quad(b2, s, b2) + _X_EPS
    for _ in range(x_iterations):
        mu = _quad(new - a1[:, None] * b1 - a2[:, None] * b2, s, m) / den_mu
        centred = new - mu[:, None] * m
        a1 = _quad(b1, s, centred - a2[:, None] * b2) / den_1
        a2 = _quad(b2, s, centred - a1[:, None] * b1) / den_2
    return (a1[:, None] * b1 + a2[:, None] * b2 + mu[:, None]) * m


# --- ARB-RC: row and column scales, no mean (binary_arb.py, *_rc_nomean) ---------------------


def _rc_init(
    res: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row scale = mean |r| per row, column scale = mean |r| / row scale per column, B = sign r."""
    a_r = masked_mean(res.abs(), mask, -1)
    ok = mask & (a_r > 0)[:, None]  # the code's NaN from 0 / 0 is skipped by nanmean
    a_c = masked_mean(res.abs() / a_r.clamp_min(1e-30)[:, None], ok, -2)
    return a_r, a_c, sign_pm(res) * mask.to(res.dtype)


def _rc_refine_pair(
    target: torch.Tensor, b: torch.Tensor, a_c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One alternating least-squares step: row scale for fixed column scale, then the reverse."""
    ac_b = a_c[None, :] * b
    a_r = safe_div((ac_b * target).sum(-1), ac_b.pow(2).sum(-1))
    ar_b = a_r[:, None] * b
    a_c = safe_div((ar_b * target).sum(-2), ar_b.pow(2).sum(-2))
    return a_r, a_c


def arb_rc_order1(
    w: torch.Tensor, mask: torch.Tensor, iterations: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ARB-RC on one plane (``high_order_residual_alternating_order1_rc_nomean``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        iterations: alternating row / column scale updates (signs stay sign(w)).

    Returns:
        (approx (out, b) zero outside the mask, row scale (out,), column scale (b,)).
    """
    m = mask.to(w.dtype)
    new = w * m
    a_r, a_c, b = _rc_init(new, mask)
    for _ in range(iterations):
        a_r, a_c = _rc_refine_pair(new, b, a_c)
    return a_r[:, None] * a_c[None, :] * b, a_r, a_c


def arb_rc_order2(w: torch.Tensor, mask: torch.Tensor, iterations: int = 15) -> torch.Tensor:
    """ARB-RC on two residual planes (``high_order_residual_alternating_order2_rc_nomean``).

    Args:
        w: (out, b) float values.
        mask: (out, b) bool group.
        iterations: alternating updates of (row, column) scales of each plane, then both planes'
            signs by the nearest of the four levels.

    Returns:
        (out, b) approximation, zero outside the mask.
    """
    m = mask.to(w.dtype)
    new = w * m
    a_r1, a_c1, b1 = _rc_init(new, mask)
    a_r2, a_c2, b2 = _rc_init(new - a_r1[:, None] * a_c1[None, :] * b1, mask)
    for _ in range(iterations):
        a_r1, a_c1 = _rc_refine_pair(new - a_r2[:, None] * a_c2[None, :] * b2, b1, a_c1)
        a_r2, a_c2 = _rc_refine_pair(new - a_r1[:, None] * a_c1[None, :] * b1, b2, a_c2)
        c1 = a_r1[:, None] * a_c1[None, :]
        c2 = a_r2[:, None] * a_c2[None, :]
        b1, b2 = _nearest_two_plane(new, c1, c2)
        b1, b2 = b1 * m, b2 * m
    return (a_r1[:, None] * a_c1[None, :] * b1 + a_r2[:, None] * a_c2[None, :] * b2) * m


# --- the block quantizer (autosearch_arb.py + bigptq_arb.py) ---------------------------------


def _arb_block(
    w: torch.Tensor,
    hinv_block: torch.Tensor,
    s: torch.Tensor | None,
    config: ArbXConfig | ArbRcConfig,
) -> tuple[torch.Tensor, Counter, dict[str, float]]:
    """Search the groups of one block and binarize them with ARB-X (``s`` given) or ARB-RC."""
    out, b = w.shape
    rc = s is None
    x, score = salient_search_inputs(w, hinv_block, config.salient_metric, config.search_on)
    sal_cols = search_salient_columns(x, score, config.salient_up_lim)
    sal = sal_cols.unsqueeze(0).expand(out, b)
    n_sal = int(sal_cols.sum())
    grid = {
        "q_low": config.split_quantile_low,
        "q_high": config.split_quantile_high,
        "steps": config.split_steps,
    }
    salient_groups: list[torch.Tensor] = []
    if n_sal > 0 and config.column_group_bitmap:
        _, sal_conc, sal_sparse = search_break_point(
            x, sal, torch.zeros_like(x), order=2, nonzero_only=True, **grid
        )
        salient_groups = [sal_sparse, sal_conc]
    elif n_sal > 0:
        salient_groups = [sal]
    if rc:
        fixed = arb_rc_order2(x, sal, config.iterations)
        error_fn = mse_error
    else:
        fixed = arb_order2(x, sal, config.iterations)[0]

        def error_fn(r: torch.Tensor) -> torch.Tensor:
            return ((r @ s) * r).sum(dim=(-2, -1))

    _, conc, sparse = search_break_point(x, ~sal, fixed, order=1, error_fn=error_fn, **grid)

    w_hat = torch.zeros_like(w)
    for g in salient_groups:
        w_hat += (
            arb_rc_order2(w, g, config.iterations)
            if rc
            else arb_x_order2(w, g, s, config.iterations, config.x_iterations)
        )
    for g in (sparse, conc):
        w_hat += (
            arb_rc_order1(w, g, config.iterations)[0]
            if rc
            else arb_x_order1(w, g, s, config.iterations, config.x_iterations)
        )
    bits = _arb_block_bits(
        out, b, n_sal, salient_groups, (sparse, conc), rc, config.column_group_bitmap
    )
    stats = {"salient_columns": float(n_sal), "sparse_weights": float(sparse.sum())}
    return w_hat, bits, stats


def _arb_block_bits(
    out: int,
    b: int,
    n_sal: int,
    salient_groups: list[torch.Tensor],
    plain_groups: tuple[torch.Tensor, torch.Tensor],
    rc: bool,
    cgb: bool,
) -> Counter:
    """Stored bits of one ARB block (layout in the module docstring)."""
    g_s = len(salient_groups)
    tally = Counter(
        {
            "sign_plane": out * b,
            "salient_residual_plane": out * n_sal,
            "salient_column_bitmap": b,
            "group_bitmap": out * b if (cgb and n_sal > 0) else out * (b - n_sal),
            "row_scale": out * FP16_BITS * (2 * g_s + 2),
        }
    )
    if rc:
        cols = 2 * sum(int(g.any(0).sum()) for g in salient_groups)
        cols += sum(int(g.any(0).sum()) for g in plain_groups)
        tally["column_scale"] = FP16_BITS * cols
    else:
        tally["row_mean"] = out * FP16_BITS * (g_s + 2)
    return tally


def _quantize_arb(
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: ArbXConfig | ArbRcConfig,
) -> QuantResult:
    w = check_weight(weight, name)
    h = check_hessian(hessian, w.shape[1], name)
    if h is None and config.needs_hessian:
        fix = (
            "ARB-X needs calibration data by design; use arb_rc without it"
            if isinstance(config, ArbXConfig)
            else "or use ArbRcConfig(salient_metric='magnitude', compensate=False)"
        )
        raise ValueError(f"{name}: this config needs a Hessian; pass hessian= ({fix})")
    stats: Counter = Counter()

    def block_fn(
        w_b: torch.Tensor, hinv_b: torch.Tensor, col0: int
    ) -> tuple[torch.Tensor, Counter]:
        s = None
        if isinstance(config, ArbXConfig):
            s = h[col0 : col0 + w_b.shape[1], col0 : col0 + w_b.shape[1]]
        q_b, bits, st = _arb_block(w_b, hinv_b, s, config)
        stats.update(st)
        return q_b, bits

    return blockwise_result(name, w, h, block_fn, config, stats)


@register_method("arb_x", ArbXConfig)
def quantize_arb_x(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: ArbXConfig
) -> QuantResult:
    """Binarize ``weight`` with ARB-LLM_X (ARB-X + CGB by default).

    Args:
        weight: (out, in) float weight.
        hessian: (in, in) float32 H = 2 X^T X / n (required: its blocks are ARB-X's S).
        config: an ``ArbXConfig``.

    Returns:
        QuantResult with w_hat (out, in) float32, honest bits, tr(R H R^T) and search info.
    """
    if not isinstance(config, ArbXConfig):
        raise ValueError(f"arb_x: config must be an ArbXConfig, got {type(config).__name__}")
    return _quantize_arb("arb_x", weight, hessian, config)


@register_method("arb_rc", ArbRcConfig)
def quantize_arb_rc(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: ArbRcConfig
) -> QuantResult:
    """Binarize ``weight`` with ARB-LLM_RC (ARB-RC + CGB by default).

    Args:
        weight: (out, in) float weight.
        hessian: (in, in) float32 H; required unless ``salient_metric="magnitude"`` and
            ``compensate=False``.
        config: an ``ArbRcConfig``.

    Returns:
        QuantResult with w_hat (out, in) float32, honest bits, tr(R H R^T) when H is given.
    """
    if not isinstance(config, ArbRcConfig):
        raise ValueError(f"arb_rc: config must be an ArbRcConfig, got {type(config).__name__}")
    return _quantize_arb("arb_rc", weight, hessian, config)
