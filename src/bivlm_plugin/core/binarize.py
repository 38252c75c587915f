"""Hybrid binarization: one binary plane per inlier ring, two residual planes for salient weights.

Representation (``BinaryCodes``), every tensor indexed by output row so that row-wise fusion
(q/k/v, gate/up) and row sharding stay trivial:

- inlier at ring k:  w_hat = mu_k + alpha_k * B          (B = +1 where ``signs`` else -1)
- salient weight:    w_hat = mu_s + a1 * B1 + a2 * B2     (B1 from ``signs``, B2 sparse)

Subsets are numbered 0..N-1 (rings) and N (salient). Scales are per row and ring
(``scale_mode="row_ring"``, ``alpha_ring`` (out, N)) or one per ring for the whole layer
(``"ring"``, ``alpha_ring`` (N,)); salient scales are always per row (``alpha_sal`` (out, 2)).
Means are one per row shared by all subsets (``mean_mode="row"``, ``mu`` (out, 1)) or one per row
and subset (``"row_subset"``, ``mu`` (out, N + 1), column N for the salient subset).

GPTQ support: ``Grid`` freezes the continuous part (means, scales, salient positions) so that
``quantize_with_grid`` only picks signs / rings / second-plane signs for columns that have been
error-compensated. Non-goals: refining the parameters (``refine.py``), bit accounting
(``bits.py``), bit packing into bytes (``format/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from .partition import Partition

__all__ = [
    "SCALE_MODES",
    "MEAN_MODES",
    "ASSIGN_MODES",
    "BinaryCodes",
    "ColumnCodes",
    "Grid",
    "LevelTable",
    "codes_from_grid",
    "codes_from_levels",
    "dense_sign2",
    "dequantize",
    "encode",
    "expand_params",
    "grid_from_codes",
    "level_table",
    "nearest_level",
    "pack_codes",
    "quantize_with_grid",
    "round_params_fp16",
    "salient_mask",
    "scale_rows",
    "subset_index",
]

logger = logging.getLogger(__name__)

SCALE_MODES = ("row_ring", "ring")
MEAN_MODES = ("row", "row_subset")
ASSIGN_MODES = ("nearest", "threshold")

# Cap on out * cols * levels floats materialized at once by the nearest-level search.
_NEAREST_CHUNK_ELEMS = 1 << 24
# Largest finite float16.
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class BinaryCodes:
    """Codes and parameters of one binarized (out, in) layer.

    Attributes:
        signs: (out, in) bool; plane B for inliers, B1 for salient positions (True = +1).
        ring: (out, in) uint8 ring index 0..N-1 (0 at salient positions, where it is unused).
        salient_idx: (out, k) int64 column indices of each row's salient weights, ascending,
            padded with -1 when rows hold fewer than k.
        salient_sign2: (out, k) bool second-plane sign B2 of each salient weight (False at pads).
        alpha_ring: (out, N) or (N,) float32 ring scales.
        alpha_sal: (out, 2) float32 salient scales (a1, a2).
        mu: (out, 1) or (out, N + 1) float32 means.
        shape: (out, in).
        col_scale: (in,) float32 scale of each input column, or None: the layer is
            ``W_hat = (row codes) * col_scale`` (one fp16 per input column, ARB-RC's column
            scales in Bi-VLM's pipeline; ``BiVLMConfig.col_scale``).
    """

    signs: torch.Tensor
    ring: torch.Tensor
    salient_idx: torch.Tensor
    salient_sign2: torch.Tensor
    alpha_ring: torch.Tensor
    alpha_sal: torch.Tensor
    mu: torch.Tensor
    shape: tuple[int, int]
    col_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        out_f, in_f = self.shape
        if self.col_scale is not None and tuple(self.col_scale.shape) != (in_f,):
            raise ValueError(
                f"BinaryCodes.col_scale must be (in,) = ({in_f},), got "
                f"{tuple(self.col_scale.shape)}"
            )
        n = self.alpha_ring.shape[-1]
        checks = {
            "signs": (tuple(self.signs.shape), (out_f, in_f)),
            "ring": (tuple(self.ring.shape), (out_f, in_f)),
            "salient_sign2": (tuple(self.salient_sign2.shape), tuple(self.salient_idx.shape)),
            "alpha_sal": (tuple(self.alpha_sal.shape), (out_f, 2)),
        }
        for name, (got, want) in checks.items():
            if got != want:
                raise ValueError(f"BinaryCodes.{name} has shape {got}, expected {want}")
        if self.salient_idx.ndim != 2 or self.salient_idx.shape[0] != out_f:
            raise ValueError(
                f"BinaryCodes.salient_idx must be (out={out_f}, k), "
                f"got {tuple(self.salient_idx.shape)}"
            )
        if tuple(self.alpha_ring.shape) not in ((out_f, n), (n,)):
            raise ValueError(
                "BinaryCodes.alpha_ring must be (out, N) or (N,), "
                f"got {tuple(self.alpha_ring.shape)}"
            )
        if tuple(self.mu.shape) not in ((out_f, 1), (out_f, n + 1)):
            raise ValueError(
                f"BinaryCodes.mu must be (out, 1) or (out, N + 1) = ({out_f}, {n + 1}), "
                f"got {tuple(self.mu.shape)}"
            )

    @property
    def n_rings(self) -> int:
        return int(self.alpha_ring.shape[-1])

    @property
    def scale_mode(self) -> str:
        return "ring" if self.alpha_ring.ndim == 1 else "row_ring"

    @property
    def mean_mode(self) -> str:
        return "row" if self.mu.shape[1] == 1 else "row_subset"

    @property
    def salient_counts(self) -> torch.Tensor:
        """(out,) int64 number of salient weights per row."""
        return (self.salient_idx >= 0).sum(dim=1)

    @property
    def fixed_k(self) -> bool:
        """True when every row holds the same number of salient weights."""
        counts = self.salient_counts
        return bool((counts == counts[0]).all()) if counts.numel() else True


@dataclass(frozen=True)
class Grid:
    """The frozen continuous part of a binarization, for GPTQ-style column quantization.

    Attributes:
        mu: (out, N + 1) float32 mean of each subset (column N: salient).
        alpha: (out, N + 1) float32 plane-1 scale of each subset (column N: a1).
        alpha2: (out, 1) float32 salient second-plane scale a2.
        salient: (out, in) bool fixed salient positions.
        center: (out, 1) float32 centre the ring thresholds apply to (``assign="threshold"``).
        thresholds: (out, N) float32 ring thresholds on |w - center| (``assign="threshold"``).
        assign: ``"nearest"`` (ring and sign of the nearest level) or ``"threshold"`` (ring from
            the thresholds, then the better sign).
        scale_mode: ``"row_ring"`` or ``"ring"`` (how to store ``alpha``'s ring columns).
        mean_mode: ``"row"`` or ``"row_subset"`` (how to store ``mu``).
    """

    mu: torch.Tensor
    alpha: torch.Tensor
    alpha2: torch.Tensor
    salient: torch.Tensor
    center: torch.Tensor
    thresholds: torch.Tensor
    assign: str
    scale_mode: str
    mean_mode: str

    @property
    def n_rings(self) -> int:
        return int(self.mu.shape[1] - 1)


@dataclass(frozen=True)
class ColumnCodes:
    """Codes chosen by ``quantize_with_grid`` for a block of columns, all (out, b).

    Attributes:
        w_hat: float32 dequantized block.
        signs: bool plane B / B1.
        ring: uint8 ring index (0 at salient positions).
        sign2: bool second-plane sign (False off salient positions).
    """

    w_hat: torch.Tensor
    signs: torch.Tensor
    ring: torch.Tensor
    sign2: torch.Tensor


def _pm1(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32) * 2.0 - 1.0


def salient_mask(codes: BinaryCodes) -> torch.Tensor:
    """(out, in) bool mask of salient positions."""
    return _scatter_rows(codes.shape, codes.salient_idx, codes.salient_idx >= 0)


def dense_sign2(codes: BinaryCodes) -> torch.Tensor:
    """(out, in) bool second-plane signs (False off salient positions)."""
    valid = codes.salient_idx >= 0
    return _scatter_rows(codes.shape, codes.salient_idx, valid & codes.salient_sign2)


def _scatter_rows(shape: tuple[int, int], idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # scatter_add so that -1 pads (mapped to column 0 with value 0) never clear a real entry.
    acc = torch.zeros(shape, dtype=torch.int32, device=idx.device)
    acc.scatter_add_(1, idx.clamp_min(0), values.to(torch.int32))
    return acc > 0


def subset_index(codes: BinaryCodes) -> torch.Tensor:
    """(out, in) int64 subset of every weight: its ring 0..N-1, or N when salient."""
    sub = codes.ring.to(torch.int64)
    return torch.where(salient_mask(codes), codes.n_rings, sub)


def expand_params(codes: BinaryCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-subset parameters in the dense layout used for fitting and dequantization.

    Returns:
        (mu, alpha, alpha2): (out, N + 1) subset means, (out, N + 1) plane-1 scales (column N is
        a1) and (out, 1) a2, all float32.
    """
    out_f = codes.shape[0]
    n = codes.n_rings
    mu = codes.mu.to(torch.float32)
    mu = mu.expand(out_f, n + 1) if mu.shape[1] == 1 else mu
    a_ring = codes.alpha_ring.to(torch.float32)
    a_ring = a_ring.unsqueeze(0).expand(out_f, n) if a_ring.ndim == 1 else a_ring
    alpha = torch.cat([a_ring, codes.alpha_sal[:, :1].to(torch.float32)], dim=1)
    return mu.contiguous(), alpha, codes.alpha_sal[:, 1:2].to(torch.float32)


def _levels(
    subset: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    mu: torch.Tensor,
    alpha: torch.Tensor,
    alpha2: torch.Tensor,
) -> torch.Tensor:
    """mu[subset] + alpha[subset] * b1 + alpha2 * b2, the one formula all paths dequantize with."""
    return mu.gather(1, subset) + alpha.gather(1, subset) * b1 + alpha2 * b2


def dequantize(codes: BinaryCodes) -> torch.Tensor:
    """Exact dequantization of ``codes``.

    Returns:
        (out, in) float32 W_hat.
    """
    mu, alpha, alpha2 = expand_params(codes)
    sal = salient_mask(codes)
    b2 = torch.where(sal, _pm1(dense_sign2(codes)), torch.zeros((), dtype=torch.float32))
    w_hat = _levels(subset_index(codes), _pm1(codes.signs), b2, mu, alpha, alpha2)
    if codes.col_scale is not None:
        w_hat = w_hat * codes.col_scale.to(w_hat.dtype)
    return w_hat


def pack_codes(
    signs: torch.Tensor,
    ring: torch.Tensor,
    salient: torch.Tensor,
    sign2: torch.Tensor,
    alpha_ring: torch.Tensor,
    alpha_sal: torch.Tensor,
    mu: torch.Tensor,
) -> BinaryCodes:
    """Build ``BinaryCodes`` from dense (out, in) masks.

    Args:
        signs: (out, in) bool plane B / B1.
        ring: (out, in) integer ring index (ignored at salient positions).
        salient: (out, in) bool salient mask.
        sign2: (out, in) bool second-plane sign (read at salient positions only).
        alpha_ring: (out, N) or (N,) ring scales.
        alpha_sal: (out, 2) salient scales.
        mu: (out, 1) or (out, N + 1) means.
    """
    out_f, in_f = signs.shape
    counts = salient.sum(dim=1)
    k = int(counts.max()) if counts.numel() else 0
    # Stable sort of ~salient puts each row's salient columns first, in ascending column order.
    order = (~salient).to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
    valid = torch.arange(k, device=signs.device).unsqueeze(0) < counts.unsqueeze(1)
    idx = torch.where(valid, order, torch.full_like(order, -1))
    s2 = sign2.gather(1, order) & valid
    ring_u8 = torch.where(salient, torch.zeros_like(ring), ring).to(torch.uint8)
    return BinaryCodes(
        signs=signs.to(torch.bool),
        ring=ring_u8,
        salient_idx=idx.to(torch.int64),
        salient_sign2=s2,
        alpha_ring=alpha_ring.to(torch.float32),
        alpha_sal=alpha_sal.to(torch.float32),
        mu=mu.to(torch.float32),
        shape=(out_f, in_f),
    )


def _masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(out,) mean of x over mask per row (0 for empty rows)."""
    m = mask.to(torch.float32)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def encode(
    weight: torch.Tensor,
    part: Partition,
    scale_mode: str = "row_ring",
    mean_mode: str = "row",
) -> BinaryCodes:
    """Closed-form initial binarization of ``weight`` on the subsets of ``part``.

    Means are subset averages, signs B = sign(w - mu), scales alpha = mean |w - mu| over the
    subset (the L2-optimal scale for those signs); salient weights get B2 = sign of the first
    plane's residual and a2 = its mean magnitude.

    Args:
        weight: (out, in) weight.
        part: the partition of this weight.
        scale_mode: ``"row_ring"`` or ``"ring"``.
        mean_mode: ``"row"`` or ``"row_subset"``.

    Returns:
        ``BinaryCodes``.
    """
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
    if mean_mode not in MEAN_MODES:
        raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {mean_mode!r}")
    w = weight.to(torch.float32)
    if tuple(w.shape) != tuple(part.ring.shape):
        raise ValueError(
            f"weight shape {tuple(w.shape)} does not match the partition {tuple(part.ring.shape)}"
        )
    n = part.n_rings
    sal = part.salient
    subset = torch.where(sal, n, part.ring.to(torch.int64))
    row_mu = w.mean(dim=1, keepdim=True)
    if mean_mode == "row":
        mu_store = row_mu
        mu_full = row_mu.expand(-1, n + 1)
    else:
        cols = []
        for s in range(n + 1):
            m = subset == s
            has = m.any(dim=1)
            cols.append(torch.where(has, _masked_row_mean(w, m), row_mu.squeeze(1)))
        mu_store = torch.stack(cols, dim=1)
        mu_full = mu_store
    dev = w - mu_full.gather(1, subset)
    signs = dev >= 0
    absdev = dev.abs()
    ring_masks = [(subset == k) for k in range(n)]
    if scale_mode == "row_ring":
        alpha_ring = torch.stack([_masked_row_mean(absdev, m) for m in ring_masks], dim=1)
    else:
        alpha_ring = torch.stack(
            [(absdev * m).sum() / m.sum().clamp_min(1) for m in ring_masks]
        ).to(torch.float32)
    a1 = _masked_row_mean(absdev, sal)
    resid = dev - a1.unsqueeze(1) * _pm1(signs)
    sign2 = resid >= 0
    a2 = _masked_row_mean(resid.abs(), sal)
    return pack_codes(
        signs, part.ring, sal, sign2, alpha_ring, torch.stack([a1, a2], dim=1), mu_store
    )


def scale_rows(codes: BinaryCodes, scale: torch.Tensor) -> BinaryCodes:
    """Codes of ``diag(scale) @ W_hat``: every level of row i times ``scale[i]``.

    Exact for per-row parameters (means and scales are multiplied; signs, rings and salient
    positions are kept), so it needs ``scale_mode: row_ring``.

    Args:
        codes: codes of an (out, in) layer.
        scale: (out,) float factors (any sign).
    """
    out_f = codes.shape[0]
    if tuple(scale.shape) != (out_f,):
        raise ValueError(f"scale_rows needs (out,) = ({out_f},) factors, got {tuple(scale.shape)}")
    if codes.scale_mode != "row_ring":
        raise ValueError(
            "scale_rows needs a scale per row (scale_mode: row_ring); these codes share one "
            "scale per ring across rows (scale_mode: ring)"
        )
    r = scale.to(torch.float32).unsqueeze(1)
    return replace(
        codes,
        alpha_ring=codes.alpha_ring.to(torch.float32) * r,
        alpha_sal=codes.alpha_sal.to(torch.float32) * r,
        mu=codes.mu.to(torch.float32) * r,
    )


def round_params_fp16(codes: BinaryCodes) -> BinaryCodes:
    """Round scales and means to fp16 values (kept as float32) so W_hat matches storage.

    Values beyond the fp16 range are clamped to it (fp16 would store inf, and inf - inf = NaN
    on dequantization).
    """

    def to_fp16(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(-_FP16_MAX, _FP16_MAX).half().float()

    return replace(
        codes,
        alpha_ring=to_fp16(codes.alpha_ring),
        alpha_sal=to_fp16(codes.alpha_sal),
        mu=to_fp16(codes.mu),
        col_scale=None if codes.col_scale is None else to_fp16(codes.col_scale),
    )


def grid_from_codes(
    codes: BinaryCodes, part: Partition | None = None, assign: str = "nearest"
) -> Grid:
    """Freeze the continuous parameters and salient positions of ``codes``.

    Args:
        codes: current codes (their signs and rings are discarded).
        part: the partition, needed for ``assign="threshold"`` (its mu and thresholds).
        assign: ``"nearest"`` or ``"threshold"``.
    """
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
    if assign == "threshold" and part is None:
        raise ValueError("assign='threshold' needs the Partition (its thresholds); pass part=")
    mu, alpha, alpha2 = expand_params(codes)
    out_f = codes.shape[0]
    if part is not None:
        center, thresholds = part.mu, part.thresholds
    else:
        center = mu[:, :1]
        thresholds = torch.full((out_f, codes.n_rings), float("inf"), device=mu.device)
    return Grid(
        mu=mu,
        alpha=alpha,
        alpha2=alpha2,
        salient=salient_mask(codes),
        center=center,
        thresholds=thresholds.contiguous(),
        assign=assign,
        scale_mode=codes.scale_mode,
        mean_mode=codes.mean_mode,
    )


def _nearest_inlier(
    w: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring and sign of the nearest inlier level mu_k +- alpha_k for every element.

    Args:
        w: (out, b) values; mu, alpha: (out, N) ring parameters.

    Returns:
        (ring int64 (out, b), sign bool (out, b)).
    """
    out_f, b = w.shape
    n = mu.shape[1]
    # Levels interleaved [mu_0 + a_0, mu_0 - a_0, mu_1 + a_1, ...]: index // 2 = ring, even = +1.
    levels = torch.stack([mu + alpha, mu - alpha], dim=2).reshape(out_f, 2 * n)
    rows = max(1, _NEAREST_CHUNK_ELEMS // max(1, b * 2 * n))
    best = torch.empty((out_f, b), dtype=torch.int64, device=w.device)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        dist = (w[r0:r1].unsqueeze(2) - levels[r0:r1].unsqueeze(1)).abs()
        best[r0:r1] = dist.argmin(dim=2)
    return best // 2, best % 2 == 0


def quantize_with_grid(
    w_cols: torch.Tensor, grid: Grid, col_idx: torch.Tensor | slice
) -> ColumnCodes:
    """Pick signs, rings and second-plane signs for columns under a frozen grid.

    Salient positions come from the grid (fixed up front); salient weights take the nearest of
    the four levels mu_s +- a1 +- a2. Inliers take the nearest level mu_k +- alpha_k over all
    rings (``assign="nearest"``) or their threshold ring and the better sign (``"threshold"``).

    Args:
        w_cols: (out, b) float columns (already error-compensated under GPTQ).
        grid: the frozen grid of the whole layer.
        col_idx: which layer columns ``w_cols`` are: a slice or a (b,) int64 tensor.

    Returns:
        ``ColumnCodes`` whose ``w_hat`` equals ``dequantize`` of the assembled codes exactly.
    """
    w = w_cols.to(torch.float32)
    sal = grid.salient[:, col_idx]
    if sal.shape != w.shape:
        raise ValueError(
            f"w_cols shape {tuple(w.shape)} does not match the grid columns selected by col_idx "
            f"{tuple(sal.shape)}"
        )
    n = grid.n_rings
    mu_r, a_r = grid.mu[:, :n], grid.alpha[:, :n]
    if grid.assign == "nearest":
        ring, sign_in = _nearest_inlier(w, mu_r, a_r)
    else:
        dev = (w - grid.center).abs().contiguous()
        ring = torch.searchsorted(grid.thresholds, dev).clamp_max(n - 1)
        d = (w - mu_r.gather(1, ring)) * a_r.gather(1, ring)
        sign_in = d >= 0
    mu_s, a1, a2 = grid.mu[:, n : n + 1], grid.alpha[:, n : n + 1], grid.alpha2
    # Nearest of mu_s + s1 a1 + s2 a2 over the four sign pairs (exact even if a2 > a1).
    cand = torch.stack(
        [mu_s + s1 * a1 + s2 * a2 for s1 in (1.0, -1.0) for s2 in (1.0, -1.0)], dim=2
    )
    pick = (w.unsqueeze(2) - cand).abs().argmin(dim=2)
    s1_sal, s2_sal = pick < 2, pick % 2 == 0
    signs = torch.where(sal, s1_sal, sign_in)
    sign2 = sal & s2_sal
    subset = torch.where(sal, n, ring)
    b2 = torch.where(sal, _pm1(sign2), torch.zeros((), dtype=torch.float32))
    w_hat = _levels(subset, _pm1(signs), b2, grid.mu, grid.alpha, grid.alpha2)
    ring_u8 = torch.where(sal, torch.zeros_like(ring), ring).to(torch.uint8)
    return ColumnCodes(w_hat=w_hat, signs=signs, ring=ring_u8, sign2=sign2)


@dataclass(frozen=True)
class LevelTable:
    """Every value a row's weights can take under a frozen ``assign="nearest"`` grid, so that
    one column's codes are a few tensor operations (GPTQ's column loop,
    ``BiVLMConfig.code_choice="column"``); ``quantize_with_grid`` gives the same codes.

    Attributes:
        levels: (out, 2N + 4) float32: the inlier levels interleaved ``mu_k + a_k, mu_k - a_k``
            (index // 2 = ring, even = sign +1), then the salient levels ``mu_s + s1 a1 + s2 a2``
            for (s1, s2) = (+, +), (+, -), (-, +), (-, -), each computed as ``_levels`` does.
        penalty: (2, 2N + 4) float32 added to the distances: row 0 (inlier weights) is +inf on
            the salient levels, row 1 (salient weights) +inf on the inlier levels.
        n_rings: N.
    """

    levels: torch.Tensor
    penalty: torch.Tensor
    n_rings: int


def level_table(grid: Grid) -> LevelTable:
    """The ``LevelTable`` of a ``"nearest"`` grid."""
    if grid.assign != "nearest":
        raise ValueError(f"a level table needs assign='nearest', got {grid.assign!r}")
    n = grid.n_rings
    mu_r, a_r = grid.mu[:, :n], grid.alpha[:, :n]
    inl = torch.stack([mu_r + a_r, mu_r - a_r], dim=2).reshape(mu_r.shape[0], 2 * n)
    mu_s, a1, a2 = grid.mu[:, n : n + 1], grid.alpha[:, n : n + 1], grid.alpha2
    sal = torch.cat([mu_s + s1 * a1 + s2 * a2 for s1 in (1.0, -1.0) for s2 in (1.0, -1.0)], 1)
    levels = torch.cat([inl, sal], dim=1).contiguous()
    inf = float("inf")
    penalty = torch.zeros((2, 2 * n + 4), dtype=torch.float32, device=levels.device)
    penalty[0, 2 * n :], penalty[1, : 2 * n] = inf, inf
    return LevelTable(levels=levels, penalty=penalty, n_rings=n)


def nearest_level(table: LevelTable, values: torch.Tensor, salient: torch.Tensor) -> torch.Tensor:
    """(out,) int64 index into ``table.levels`` of each row's nearest allowed level (first on
    ties, as ``quantize_with_grid``); ``values`` (out,) float32, ``salient`` (out,) bool."""
    dist = (values.unsqueeze(1) - table.levels).abs_()
    dist.add_(table.penalty[salient.long()])
    return dist.argmin(dim=1)


def codes_from_levels(
    index: torch.Tensor, n_rings: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signs, rings and second-plane signs ((out, in) bool, uint8, bool, as
    ``quantize_with_grid``) of ``LevelTable`` indices (out, in)."""
    sal = index >= 2 * n_rings
    pick = index - 2 * n_rings
    signs = torch.where(sal, pick < 2, index % 2 == 0)
    ring = torch.where(sal, torch.zeros_like(index), index // 2).to(torch.uint8)
    return signs, ring, sal & (pick % 2 == 0)


def codes_from_grid(
    grid: Grid,
    signs: torch.Tensor,
    ring: torch.Tensor,
    sign2: torch.Tensor,
) -> BinaryCodes:
    """Assemble ``BinaryCodes`` from a grid and dense (out, in) codes."""
    n = grid.n_rings
    alpha_ring = grid.alpha[:, :n]
    if grid.scale_mode == "ring":
        alpha_ring = alpha_ring[0]
    mu = grid.mu[:, :1] if grid.mean_mode == "row" else grid.mu
    alpha_sal = torch.cat([grid.alpha[:, n : n + 1], grid.alpha2], dim=1)
    return pack_codes(signs, ring, grid.salient, sign2, alpha_ring, alpha_sal, mu)
