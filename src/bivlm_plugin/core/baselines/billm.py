"""BiLLM (Huang et al., arXiv 2402.04291), ported from the authors' code.

Source: github.com/Aaronhuang-778/BiLLM at f7f9e14: ``bigptq.py`` (``BRAGPTQ.fasterquant``, the
block loop), ``binary.py`` (``high_order_residual``, the residual binarizer), ``utils/structure.py``
(``structural_guassian_distribution``, the salient metric), ``utils/autosearch.py``
(``structural_searching``, the two searches) and ``utils/mask.py`` (``generate_structural_mask``).
``run.sh`` runs every model with ``--blocksize 128 --salient_metric hessian`` and 128 calibration
samples (``--nsamples`` default): the defaults here. Calibration lives with the caller: accumulate
H over 128 samples (DESIGN.md protocol P1 uses 128 windows of 512 tokens).

Per block of 128 columns (already GPTQ-compensated by the earlier blocks):

1. Metric. ``hessian``: s_ij = w_ij^2 / d_j^2 with d_j the diagonal of the upper Cholesky factor
   of H^-1 (the code's ``H`` at that point; the paper writes [H^-1]_jj). ``magnitude``: w_ij.
2. Structural salient search. Columns are ranked by the column sum of |s|; for k = 1..49
   (``range(1, up_lim)``, up_lim = 50) the top-k columns form the salient set; both the salient
   and the non-salient parts get an order-2 residual binarization and the k with the smallest
   MSE wins.
3. Bell-shaped split. On the non-salient part, 81 break points p (the 10th..90th percentiles of
   |s * non-salient mask|, zeros of the salient columns included as in the code) split it into a
   concentrated group |s| < p and a sparse group |s| >= p; each gets an order-1 binarization,
   and the p with the smallest MSE (salient part fixed at its order-2 approximation) wins.
4. The block's weights (not the metric) are then binarized with those masks: order 2 on the
   salient columns, order 1 on each non-salient group; each order is alpha * B + mu per row,
   alpha = mean |x - mu| over the group's entries of the row, mu their mean.

Faithfulness notes:
    * ``search_on="metric"`` (default) runs steps 2-3 on the metric matrix s, exactly as the code
      does (``structural_searching(target_weights, ...)``); ``"weight"`` keeps the metric for the
      column ranking but scores candidates and places the break point on the weights, as the
      paper's text reads. With ``salient_metric="magnitude"`` both are the same.
    * Compensation (``faithful=True``, the default) is the research code's: the whole block is
      quantized first, every column's error is taken against the block as quantized, and the
      block's errors are spread onto the columns after it only. ``faithful=False`` runs the
      shared ``gptq_compensate`` update, which also spreads each column's error onto the later
      columns of its own block (the exact OBC update for fixed codes). The two measure
      differently at P1 (docs/RESULTS.md section 9); the baseline rows use the faithful one.
    * Narrow blocks (the last block of in = 545, 576...): the code calls ``topk(·, 50)`` and would
      fail below 50 columns; here the search stops at b - 1 salient columns (none when b = 1).
    * A stored plane has no zero: an entry exactly at its mean gets +1 (``torch.sign`` gives 0).

Storage layout counted (DESIGN.md section 2), per block of b columns, out rows, s salient columns:
    * ``sign_plane``: out * b bits (first plane of every weight);
    * ``salient_residual_plane``: out * s bits (second plane of salient weights);
    * ``salient_column_bitmap``: b bits (BiLLM's column bitmap);
    * ``group_bitmap``: out * (b - s) bits (concentrated vs sparse, non-salient weights only);
    * ``row_scale``: fp16 alpha per row for concentrated, sparse and both salient orders
      (4 * out * 16 bits);
    * ``row_mean``: fp16 mean per row for concentrated, sparse and salient (the two salient
      orders' means are constants of the same row, so one folded mean: 3 * out * 16 bits).
That is 7 fp16 per row per block = 0.875 bits per weight at b = 128 on top of 1 + s/b plane bits
and 1 - s/b bitmap bits: 3 + 1/out bits per weight per full block whatever s is, where the paper
reports ~1.1 (its weight bits: planes only). Measured on seeded Laplacian weights, out = 576:
weight bits 1.148 / storage bits 2.974 at in = 576 (the 64-column last block pays its 7 fp16 per
row over fewer columns) and 1.208 / 2.877 at in = 1536.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bivlm_plugin.core.baselines._common import (
    FP16_BITS,
    candidate_chunk,
    check_hessian,
    check_weight,
    error_or_none,
    masked_mean,
    quantiles,
    run_blockwise,
    sign_pm,
)
from bivlm_plugin.core.types import BitCount, QuantResult, register_method

__all__ = [
    "StructuredSearchConfig",
    "BillmConfig",
    "residual_binarize",
    "salient_search_inputs",
    "search_salient_columns",
    "search_break_point",
    "mse_error",
    "quantize_billm",
]

logger = logging.getLogger(__name__)

ErrorFn = Callable[[torch.Tensor], torch.Tensor]
"""(K, out, b) residuals -> (K,) scores, lower is better."""

_METRICS = ("hessian", "magnitude")
_SEARCH_ON = ("metric", "weight")


@dataclass(frozen=True)
class StructuredSearchConfig:
    """Knobs shared by BiLLM and ARB-LLM (both use BiLLM's block loop and searches).

    Attributes:
        block_size: columns per block (masks, salient columns and scales are per block).
        salient_metric: ``"hessian"`` (w^2 / d^2) or ``"magnitude"`` (w).
        salient_up_lim: the code's ``up_lim``: 1..up_lim-1 salient columns are tried per block.
        split_quantile_low: lowest break-point percentile (share, 0.10 in the code).
        split_quantile_high: highest break-point percentile (0.90).
        split_steps: number of break points tried (81: steps of one percentile).
        search_on: ``"metric"`` (the code) or ``"weight"`` (the paper's text); see module doc.
        compensate: GPTQ / OBC error compensation between columns (the code's default; False is
            its ``--disable_gptq``).
        percdamp: Hessian damping as a share of its mean diagonal.
        faithful: the research code's block update (``BRAGPTQ.fasterquant``: in-block errors
            taken against the quantized block, spread onto later blocks only); False spreads
            each column's error inside its block too (see module doc).
    """

    block_size: int = 128
    salient_metric: str = "hessian"
    salient_up_lim: int = 50
    split_quantile_low: float = 0.10
    split_quantile_high: float = 0.90
    split_steps: int = 81
    search_on: str = "metric"
    compensate: bool = True
    percdamp: float = 0.01
    faithful: bool = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"{name}.block_size must be a positive int, got {self.block_size!r}")
        if self.salient_metric not in _METRICS:
            raise ValueError(
                f"{name}.salient_metric must be one of {_METRICS}, got {self.salient_metric!r}"
            )
        if not isinstance(self.salient_up_lim, int) or self.salient_up_lim < 2:
            raise ValueError(
                f"{name}.salient_up_lim must be an int >= 2 (tries 1..up_lim-1 salient "
                f"columns), got {self.salient_up_lim!r}"
            )
        if not 0.0 <= self.split_quantile_low <= self.split_quantile_high <= 1.0:
            raise ValueError(
                f"{name} needs 0 <= split_quantile_low <= split_quantile_high <= 1, got "
                f"{self.split_quantile_low!r} and {self.split_quantile_high!r}"
            )
        if not isinstance(self.split_steps, int) or self.split_steps < 1:
            raise ValueError(f"{name}.split_steps must be an int >= 1, got {self.split_steps!r}")
        if self.search_on not in _SEARCH_ON:
            raise ValueError(
                f"{name}.search_on must be one of {_SEARCH_ON}, got {self.search_on!r}"
            )
        if not isinstance(self.compensate, bool):
            raise ValueError(f"{name}.compensate must be a bool, got {self.compensate!r}")
        if not isinstance(self.faithful, bool):
            raise ValueError(
                f"{name}.faithful must be a bool (true: the authors' block update), got "
                f"{self.faithful!r}"
            )
        if not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"{name}.percdamp must be in [0, 1), got {self.percdamp!r}")

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing with this config needs a Hessian."""
        return self.compensate or self.salient_metric == "hessian"


@dataclass(frozen=True)
class BillmConfig(StructuredSearchConfig):
    """Config of ``billm``: the defaults of BiLLM's ``run.sh`` (see ``StructuredSearchConfig``)."""


def residual_binarize(x: torch.Tensor, mask: torch.Tensor, order: int = 2) -> torch.Tensor:
    """BiLLM's ``high_order_residual``: ``order`` stacked per-row binarizations of a masked group.

    Each order binarizes the residual left by the previous ones as alpha * sign(r - mu) + mu,
    mu = mean of r over the group's entries of the row, alpha = mean |r - mu| over them.

    Args:
        x: (out, b) float values.
        mask: (..., out, b) bool group membership; leading dims score several candidate masks
            at once.
        order: number of binary planes (1 or 2 in BiLLM).

    Returns:
        (..., out, b) approximation, zero outside the mask.
    """
    m = mask.to(x.dtype)
    target = x * m
    approx = torch.zeros_like(target)
    for _ in range(order):
        res = target - approx
        mu = masked_mean(res, mask, -1).unsqueeze(-1)
        centred = res - mu
        alpha = masked_mean(centred.abs(), mask, -1).unsqueeze(-1)
        approx = approx + (alpha * sign_pm(centred) + mu) * m
    return approx


def mse_error(residual: torch.Tensor) -> torch.Tensor:
    """The code's ``error_computing``: mean squared residual per candidate, (K, out, b) -> (K,)."""
    return residual.pow(2).mean(dim=(-2, -1))


def salient_search_inputs(
    w: torch.Tensor, hinv_block: torch.Tensor, metric: str, search_on: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix the searches run on and the column ranking score.

    Args:
        w: (out, b) block weights.
        hinv_block: (b, b) block of the upper Cholesky factor of H^-1.
        metric: ``"hessian"`` or ``"magnitude"``.
        search_on: ``"metric"`` or ``"weight"``.

    Returns:
        (x (out, b) the matrix searched, score (b,) column saliency: sum of |metric|).
    """
    if metric == "hessian":
        target = w.pow(2) / torch.diagonal(hinv_block).pow(2).unsqueeze(0)
    else:
        target = w
    x = target if search_on == "metric" else w
    return x, target.abs().sum(dim=0)


def search_salient_columns(
    x: torch.Tensor, column_score: torch.Tensor, up_lim: int = 50
) -> torch.Tensor:
    """BiLLM's structural salient search (first half of ``structural_searching``).

    Tries the top-k columns by ``column_score`` for k = 1..min(up_lim, b)-1, binarizing both the
    salient and the non-salient part with order 2, and keeps the k with the smallest MSE (first
    minimum on ties, as the code's strict ``<``).

    Args:
        x: (out, b) matrix searched.
        column_score: (b,) saliency of each column.
        up_lim: the code's ``up_lim``.

    Returns:
        (b,) bool mask of salient columns (all False when b == 1).
    """
    out, b = x.shape
    k_max = min(up_lim, b)
    cols = torch.zeros(b, dtype=torch.bool, device=x.device)
    if k_max < 2:
        return cols
    ranked = torch.topk(column_score, k_max).indices
    ks = torch.arange(1, k_max, device=x.device)
    errors = []
    for chunk in torch.split(ks, candidate_chunk(out, b)):
        take = torch.arange(k_max, device=x.device)[None, :] < chunk[:, None]  # (K, k_max)
        col_mask = torch.zeros(chunk.numel(), b, dtype=torch.bool, device=x.device)
        col_mask[:, ranked] = take
        sal = col_mask[:, None, :].expand(-1, out, -1)
        approx = residual_binarize(x, sal, 2) + residual_binarize(x, ~sal, 2)
        errors.append(mse_error(x - approx))
    best_k = int(ks[torch.argmin(torch.cat(errors))])
    cols[ranked[:best_k]] = True
    return cols


def search_break_point(
    x: torch.Tensor,
    region: torch.Tensor,
    fixed_approx: torch.Tensor,
    *,
    order: int = 1,
    q_low: float = 0.10,
    q_high: float = 0.90,
    steps: int = 81,
    error_fn: ErrorFn = mse_error,
    nonzero_only: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """BiLLM's bell-shaped split of ``region`` into concentrated and sparse groups.

    Candidate break points are the ``steps`` percentiles in [q_low, q_high] of |x * region|
    (over every entry, zeros outside the region included, as the code does; ``nonzero_only``
    drops zeros, as ARB-LLM's salient split does). For each break point p the region splits into
    |x| < p (concentrated) and |x| >= p (sparse), each binarized with ``order`` planes, and the p
    whose total approximation (plus ``fixed_approx`` for the rest of the block) scores lowest
    wins.

    Args:
        x: (out, b) matrix searched.
        region: (out, b) bool entries to split.
        fixed_approx: (out, b) approximation of the entries outside the region (0 allowed).
        order: planes per group during the search.
        q_low, q_high, steps: the percentile grid.
        error_fn: (K, out, b) residuals -> (K,) scores.
        nonzero_only: take percentiles over the nonzero entries only.

    Returns:
        (break point, concentrated mask (out, b), sparse mask (out, b)).
    """
    out, b = x.shape
    mag = (x * region).abs()
    pool = mag.reshape(-1)
    if nonzero_only:
        pool = pool[pool != 0]
    if pool.numel() == 0:
        pool = torch.zeros(1, dtype=x.dtype, device=x.device)
    grid = torch.linspace(q_low, q_high, steps, dtype=torch.float64, device=x.device)
    candidates = quantiles(pool, grid)
    errors = []
    for chunk in torch.split(candidates, candidate_chunk(out, b)):
        sparse = (mag.unsqueeze(0) >= chunk[:, None, None]) & region
        conc = (mag.unsqueeze(0) < chunk[:, None, None]) & region
        approx = (
            fixed_approx + residual_binarize(x, sparse, order) + residual_binarize(x, conc, order)
        )
        errors.append(error_fn(x - approx))
    best = int(torch.argmin(torch.cat(errors)))
    split = candidates[best]
    return float(split), (mag < split) & region, (mag >= split) & region


def _billm_block_bits(out: int, b: int, n_salient: int) -> Counter:
    """Stored bits of one BiLLM block (layout in the module docstring)."""
    has_sal = 1 if n_salient > 0 else 0
    return Counter(
        {
            "sign_plane": out * b,
            "salient_residual_plane": out * n_salient,
            "salient_column_bitmap": b,
            "group_bitmap": out * (b - n_salient),
            "row_scale": out * FP16_BITS * (2 + 2 * has_sal),
            "row_mean": out * FP16_BITS * (2 + has_sal),
        }
    )


def billm_block(
    w: torch.Tensor, hinv_block: torch.Tensor, config: StructuredSearchConfig
) -> tuple[torch.Tensor, Counter, dict[str, float]]:
    """Quantize one block as ``BRAGPTQ.fasterquant`` does before compensation.

    Args:
        w: (out, b) float32 block (already compensated by earlier blocks).
        hinv_block: (b, b) block of the upper Cholesky factor of H^-1.
        config: search knobs.

    Returns:
        (w_hat (out, b), stored bits of the block, stats: salient columns, sparse share).
    """
    out, b = w.shape
    x, score = salient_search_inputs(w, hinv_block, config.salient_metric, config.search_on)
    sal_cols = search_salient_columns(x, score, config.salient_up_lim)
    sal = sal_cols.unsqueeze(0).expand(out, b)
    _, conc, sparse = search_break_point(
        x,
        ~sal,
        residual_binarize(x, sal, 2),
        order=1,
        q_low=config.split_quantile_low,
        q_high=config.split_quantile_high,
        steps=config.split_steps,
    )
    w_hat = (
        residual_binarize(w, sal, 2)
        + residual_binarize(w, conc, 1)
        + residual_binarize(w, sparse, 1)
    )
    n_sal = int(sal_cols.sum())
    stats = {"salient_columns": float(n_sal), "sparse_weights": float(sparse.sum())}
    return w_hat, _billm_block_bits(out, b, n_sal), stats


def plane_bits(tally: Counter) -> int:
    """Total binary-plane bits of a tally (components named ``*_plane``)."""
    return int(sum(v for k, v in tally.items() if k.endswith("_plane")))


@register_method("billm", BillmConfig)
def quantize_billm(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: BillmConfig
) -> QuantResult:
    """Binarize ``weight`` with BiLLM.

    Args:
        weight: (out, in) float weight.
        hessian: (in, in) float32 H = 2 X^T X / n; required unless
            ``salient_metric="magnitude"`` and ``compensate=False``.
        config: a ``BillmConfig``.

    Returns:
        QuantResult: w_hat (out, in) float32, honest bits, tr(R H R^T) when H is given, and info
        (``salient_column_share``, ``sparse_share`` of the non-salient weights, ``n_blocks``).
    """
    if not isinstance(config, BillmConfig):
        raise ValueError(f"billm: config must be a BillmConfig, got {type(config).__name__}")
    w = check_weight(weight, "billm")
    h = check_hessian(hessian, w.shape[1], "billm")
    if h is None and config.needs_hessian:
        raise ValueError(
            "billm: this config needs a Hessian (salient_metric='hessian' or compensate=True); "
            "pass hessian=, or use BillmConfig(salient_metric='magnitude', compensate=False)"
        )
    stats: Counter = Counter()

    def block_fn(
        w_b: torch.Tensor, hinv_b: torch.Tensor, col0: int
    ) -> tuple[torch.Tensor, Counter]:
        q_b, bits, st = billm_block(w_b, hinv_b, config)
        stats.update(st)
        return q_b, bits

    return blockwise_result("billm", w, h, block_fn, config, stats)


def blockwise_result(
    name: str,
    w: torch.Tensor,
    h: torch.Tensor | None,
    block_fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, Counter]],
    config: BillmConfig,
    stats: Counter,
) -> QuantResult:
    """Run a column-block quantizer of the BiLLM family and package its result.

    Shared by BiLLM and ARB-LLM: block loop with optional compensation, honest bit tally, and
    the salient-column / sparse-group shares for reports.
    """
    w_hat, tally, n_blocks = run_blockwise(
        w,
        h,
        block_fn,
        block_size=config.block_size,
        compensate=config.compensate,
        percdamp=config.percdamp,
        faithful=config.faithful,
    )
    out, n_in = w.shape
    bits = BitCount.from_breakdown(out * n_in, plane_bits(tally), tally)
    n_sal_weights = stats["salient_columns"] * out
    info = {
        "n_blocks": n_blocks,
        "salient_column_share": stats["salient_columns"] / n_in,
        "sparse_share": stats["sparse_weights"] / max(1.0, out * n_in - n_sal_weights),
    }
    logger.debug("%s %dx%d: %s", name, out, n_in, info)
    return QuantResult(w_hat=w_hat, bits=bits, error=error_or_none(w, w_hat, h), info=info)
