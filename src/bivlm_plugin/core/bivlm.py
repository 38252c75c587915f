"""Bi-VLM layer quantizer: partition, hybrid binarization, refinement, GPTQ compensation and the
saliency-aware choice of the salient share under a bit budget (DESIGN.md sections 1 and 2).

Pipeline for one (out, in) weight W and Hessian H (or None):

1. Gaussian-quantile partition of W (``partition.py``); salient positions are chosen on the
   original W by the Hessian-aware score (w - mu)^2 / d_j^2 or by |w - mu|, and stay fixed.
2. Closed-form binarization (``binarize.encode``), then ARB / ARB-X refinement (``refine.py``).
3. With H and ``compensate``: GPTQ block-wise compensation (``compensate.gptq_compensate``) with
   the grid (means, scales, salient positions) frozen; only signs / rings / second-plane signs are
   re-chosen for compensated columns. The parameters are then re-fitted by least squares on the
   final codes against tr(R H R^T) (codes kept). The compensated codes are kept only when they
   do not raise tr(R H R^T) over the refined ones (``info["compensated"]``). Dead inputs (zero
   Hessian diagonal) never reach the output: as in GPTQ their weights are zeroed in the
   compensated weight, and they are never preferred as salient. The mean / scale solves of
   steps 2 and 3 use H damped by ``percdamp`` (as the compensation does), since calibration
   Hessians are often rank-deficient.
4. With ``p_sal_candidates``: every candidate within ``bit_budget`` storage bits is run and the
   one of least tr(R H R^T) (Frobenius error without H) is kept; with ``candidate_search``
   ``"encoded"`` / ``"refined"`` the candidates are compared on the error after step 1 / the
   first refinement iteration and only the winner goes on (one compensation per layer
   instead of one per share).

With ``col_scale`` the layer also stores one fp16 scale per input column c, W_hat = Q * c (Q the
row-wise codes above). It is a change of variables: steps 1-4 run on W' = W diag(1/c) with
H' = diag(c) H diag(c), whose tr(R' H' R'^T) is the original layer's error exactly, from c
taken as each column's mean absolute deviation over rows in units of the row's spread
(geometric mean 1); then c is re-solved by least squares against tr(R H R^T) with Q fixed (a
linear system (H * Q^T Q) c = diag(Q^T W H)) and kept when it lowers the error.

Importing this module registers the method as ``"bivlm"`` (``types.get_method``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .binarize import (
    ASSIGN_MODES,
    MEAN_MODES,
    SCALE_MODES,
    BinaryCodes,
    Grid,
    codes_from_grid,
    codes_from_levels,
    dequantize,
    encode,
    grid_from_codes,
    level_table,
    nearest_level,
    quantize_with_grid,
    round_params_fp16,
)
from .bits import count_bits
from .checks import require_finite
from .colscale import initial_col_scale, solve_col_scale
from .compensate import gptq_compensate
from .hessian import inverse_cholesky
from .partition import (
    SALIENT_SELECT_MODES,
    STATS_MODES,
    partition,
    row_stats,
    saliency_ranking,
    saliency_score,
)
from .refine import layer_error, refine, refit
from .types import BitCount, QuantResult, register_method

__all__ = [
    "BiVLMConfig",
    "LayerCandidates",
    "SALIENT_METRICS",
    "bivlm_candidates",
    "bivlm_options",
    "quantize_bivlm",
]

logger = logging.getLogger(__name__)

SALIENT_METRICS = ("hessian", "hessian_error", "magnitude")
CODE_CHOICES = ("block", "column")
CANDIDATE_SEARCHES = ("full", "encoded", "refined")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"BiVLMConfig.{name} must be one of {allowed}, got {value!r}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"BiVLMConfig.{name} must be an int >= {low}, got {value!r}")


def _share(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 0.5:
        raise ValueError(
            f"BiVLMConfig.{name} must be a salient share in [0, 0.5), got {value!r}; "
            "the paper uses about 0.01 (language model) to 0.05 (vision encoder)"
        )


@dataclass(frozen=True)
class BiVLMConfig:
    """Configuration of ``quantize_bivlm``; validated at construction.

    Attributes:
        p_sal: salient share of the weights (used when ``p_sal_candidates`` is None).
        n_rings: inlier rings N (ring plane costs ceil(log2 N) bits per weight).
        stats: partition statistics, ``"row"`` or ``"layer"``.
        scale_mode: ``"row_ring"`` (a scale per row and ring) or ``"ring"`` (one per ring).
        mean_mode: ``"row"`` (one mean per row) or ``"row_subset"`` (per row and subset).
        salient_select: ``"topk"`` (same count per row) or ``"threshold"`` (Gaussian tail).
        salient_metric: ``"hessian"`` ((w - mu)^2 / d_j^2, BiLLM's score), ``"hessian_error"``
            (e^2 / d_j^2 with e the weight's error as an inlier) or ``"magnitude"`` (|w - mu|);
            the Hessian scores fall back to magnitude without H.
        assign: how codes are picked for a value under a fixed grid: ``"nearest"`` level or
            the partition's ``"threshold"`` ring.
        refine_iters: ARB iterations (mean, scale, code steps) before compensation.
        refine_weighted: refine against tr(R H R^T) (ARB-X) when H is given.
        compensate: GPTQ block-wise error compensation (needs H).
        code_choice: under compensation, ``"block"`` picks a block's codes once, then spreads
            their errors (BiLLM's order); ``"column"`` re-picks each column's codes after the
            errors of the columns before it (GPTQ proper; the grid is frozen either way).
        act_order: under compensation, visit the columns in decreasing order of the Hessian
            diagonal (GPTQ's activation ordering, llm-compressor's ``actorder``): the inputs
            that matter most are coded first, while the most later columns remain to absorb
            their error. Only the order of the pass changes; the codes and the format do not.
        refit_iters: mean / scale least-squares passes on the final codes after compensation.
        block_size: GPTQ block width (the last block may be narrower).
        percdamp: Hessian damping as a share of its mean diagonal.
        p_sal_candidates: salient shares to choose from per layer, or None.
        bit_budget: maximum storage bits per weight, or None for no limit.
        candidate_search: how the shares within the budget are compared. ``"full"``: each
            runs the whole pipeline and the least final error wins. ``"encoded"``: each is
            scored by the error of its closed-form codes (a partition and one encode, no
            refinement or compensation) and only the winner runs the rest; ``"refined"``:
            scored after the first refinement iteration, the winner goes on from there. Either
            way the winner's codes are exactly the full pipeline's at its share, and only one
            candidate per layer is compensated.
        fp16_params: round scales and means to fp16 as they are stored.
        col_scale: also store one fp16 scale per input column (16 / out extra storage bits
            per weight; see the module docstring). Not in the packed format yet.
    """

    p_sal: float = 0.01
    n_rings: int = 1
    stats: str = "row"
    scale_mode: str = "row_ring"
    mean_mode: str = "row"
    salient_select: str = "topk"
    salient_metric: str = "hessian"
    assign: str = "nearest"
    refine_iters: int = 3
    refine_weighted: bool = True
    compensate: bool = True
    code_choice: str = "block"
    act_order: bool = False
    refit_iters: int = 2
    block_size: int = 128
    percdamp: float = 0.01
    p_sal_candidates: tuple[float, ...] | None = None
    bit_budget: float | None = None
    candidate_search: str = "full"
    fp16_params: bool = True
    col_scale: bool = False

    def __post_init__(self) -> None:
        _share("p_sal", self.p_sal)
        _int_at_least("n_rings", self.n_rings, 1)
        if self.n_rings > 256:
            raise ValueError(
                f"BiVLMConfig.n_rings must be <= 256 (uint8 ring indices), got {self.n_rings}"
            )
        _choice("stats", self.stats, STATS_MODES)
        _choice("scale_mode", self.scale_mode, SCALE_MODES)
        _choice("mean_mode", self.mean_mode, MEAN_MODES)
        _choice("salient_select", self.salient_select, SALIENT_SELECT_MODES)
        _choice("salient_metric", self.salient_metric, SALIENT_METRICS)
        _choice("assign", self.assign, ASSIGN_MODES)
        _choice("code_choice", self.code_choice, CODE_CHOICES)
        _choice("candidate_search", self.candidate_search, CANDIDATE_SEARCHES)
        _int_at_least("refine_iters", self.refine_iters, 0)
        _int_at_least("refit_iters", self.refit_iters, 0)
        _int_at_least("block_size", self.block_size, 1)
        for name in ("refine_weighted", "compensate", "act_order", "fp16_params", "col_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BiVLMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.percdamp, bool) or not 0.0 <= float(self.percdamp) < 1.0:
            raise ValueError(f"BiVLMConfig.percdamp must be in [0, 1), got {self.percdamp!r}")
        if self.p_sal_candidates is not None:
            cands = tuple(self.p_sal_candidates)
            if not cands:
                raise ValueError(
                    "BiVLMConfig.p_sal_candidates is empty; give at least one share or None"
                )
            for c in cands:
                _share("p_sal_candidates[...]", c)
            object.__setattr__(self, "p_sal_candidates", cands)
        if self.bit_budget is not None and (
            isinstance(self.bit_budget, bool)
            or not isinstance(self.bit_budget, (int, float))
            or not math.isfinite(self.bit_budget)
            or self.bit_budget <= 0
        ):
            raise ValueError(
                f"BiVLMConfig.bit_budget must be a positive number of storage bits per weight "
                f"or None, got {self.bit_budget!r}"
            )


@dataclass(frozen=True)
class _Candidate:
    p_sal: float
    codes: BinaryCodes
    bits: BitCount
    error: float
    info: dict[str, Any]


def _check_inputs(weight: torch.Tensor, hessian: torch.Tensor | None) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a non-empty 2-D (out, in) tensor, got {shape}")
    if not torch.is_floating_point(weight):
        raise ValueError(f"weight must be a float tensor, got dtype {weight.dtype}")
    require_finite(
        weight.detach().to(torch.float32),
        "bivlm: weight",
        "quantize a finite weight (check the checkpoint: a diverged fine-tune or an fp16 "
        "overflow leaves NaN / inf)",
    )
    if hessian is None:
        return
    if not isinstance(hessian, torch.Tensor):
        raise ValueError(
            f"bivlm: hessian must be a torch.Tensor or None, got {type(hessian).__name__}"
        )
    in_f = weight.shape[1]
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(
            f"hessian must be (in, in) = ({in_f}, {in_f}) for weight {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    require_finite(
        hessian.detach().to(torch.float32),
        f"bivlm: hessian of weight {tuple(weight.shape)}",
        "check the calibration inputs (NaN / inf activations, e.g. an fp16 overflow in the "
        "model) or pass hessian=None",
    )


def _compensate(
    w: torch.Tensor,
    codes: BinaryCodes,
    hinv: torch.Tensor,
    part: Any,
    config: BiVLMConfig,
    perm: torch.Tensor | None = None,
) -> BinaryCodes:
    """GPTQ pass with a frozen grid; returns codes picked on the compensated columns.

    ``w`` should already have its dead-input columns zeroed (``_zero_dead``). With ``perm``
    (act order) the pass visits column ``perm[k]`` k-th and ``hinv`` is the factor of
    ``H[perm][:, perm]``; the codes come back in the layer's own column order.
    """
    grid = grid_from_codes(codes, part, config.assign)
    column_wise = config.code_choice == "column"
    if column_wise and grid.assign == "nearest":
        return _compensate_by_levels(w, grid, hinv, config, perm)
    signs = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    ring = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    sign2 = torch.empty(w.shape, dtype=torch.bool, device=w.device)

    def quantize_block(w_b: torch.Tensor, _hinv_b: torch.Tensor, col0: int) -> torch.Tensor:
        cols = slice(col0, col0 + w_b.shape[1])
        if perm is not None:
            cols = perm[cols]
        cc = quantize_with_grid(w_b, grid, cols)
        signs[:, cols], ring[:, cols], sign2[:, cols] = cc.signs, cc.ring, cc.sign2
        return cc.w_hat

    gptq_compensate(
        w if perm is None else w[:, perm],
        hinv,
        quantize_block,
        block_size=config.block_size,
        column_wise=column_wise,
    )
    return codes_from_grid(grid, signs, ring, sign2)


def _compensate_by_levels(
    w: torch.Tensor,
    grid: Grid,
    hinv: torch.Tensor,
    config: BiVLMConfig,
    perm: torch.Tensor | None,
) -> BinaryCodes:
    """``_compensate``'s column-wise pass for a ``"nearest"`` grid: each column's codes are the
    nearest entries of the grid's ``LevelTable`` (the codes ``quantize_with_grid`` picks, in a
    few tensor operations a column), decoded once at the end."""
    table = level_table(grid)
    salient = grid.salient if perm is None else grid.salient[:, perm]
    index = torch.empty(w.shape, dtype=torch.int64, device=w.device)  # pass order

    def quantize_column(w_col: torch.Tensor, _hinv: torch.Tensor, k: int) -> torch.Tensor:
        index[:, k] = nearest_level(table, w_col[:, 0], salient[:, k])
        return table.levels.gather(1, index[:, k : k + 1])

    gptq_compensate(
        w if perm is None else w[:, perm],
        hinv,
        quantize_column,
        block_size=config.block_size,
        column_wise=True,
    )
    if perm is not None:
        index = index[:, torch.argsort(perm)]
    return codes_from_grid(grid, *codes_from_levels(index, table.n_rings))


def _zero_dead(w: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
    """``w`` with the columns of dead inputs (zero Hessian diagonal) zeroed, as GPTQ does."""
    if dead is None or not bool(dead.any()):
        return w
    return w.masked_fill(dead.unsqueeze(0), 0.0)


def _saliency(
    w: torch.Tensor,
    hinv: torch.Tensor | None,
    config: BiVLMConfig,
    dead: torch.Tensor | None = None,
) -> torch.Tensor:
    """(out, in) salient score of ``config.salient_metric`` (magnitude when H is missing).

    With a Hessian score, dead inputs score 0 (their weights never reach the output), so they
    are salient only when a row has nothing better.
    """
    mu, _ = row_stats(w, config.stats)
    if config.salient_metric == "magnitude" or hinv is None:
        return saliency_score(w, mu)
    d = torch.diagonal(hinv)
    if config.salient_metric == "hessian":
        return _zero_dead(saliency_score(w, mu, d), dead)
    # "hessian_error": the error a weight would cost as an inlier (nearest level of a
    # salient-free binarization), over d_j^2: the OBS cost of not protecting it.
    part0 = partition(w, 0.0, config.n_rings, config.stats)
    grid0 = grid_from_codes(encode(w, part0, config.scale_mode, config.mean_mode))
    inlier_err = w - quantize_with_grid(w, grid0, slice(None)).w_hat
    return _zero_dead(saliency_score(inlier_err, torch.zeros_like(mu), d), dead)


@dataclass(frozen=True)
class _Encoded:
    """A candidate after partition and closed-form codes (bits fixed from here on)."""

    p_sal: float
    part: Any
    codes: BinaryCodes
    bits: BitCount
    info: dict[str, Any]
    # Row errors of ``codes`` under the refinement's metric, once refined (``refine`` goes on
    # from them, and the cheap search scores by them).
    row_err: torch.Tensor | None = None


def _encode_candidate(
    w: torch.Tensor,
    score: torch.Tensor,
    p_sal: float,
    config: BiVLMConfig,
    order: torch.Tensor | None = None,
) -> _Encoded:
    """Partition at salient share ``p_sal`` (salient by ``score``, ``_saliency``: the same for
    every share) and the closed-form codes (``binarize.encode``)."""
    part = partition(w, p_sal, config.n_rings, config.stats, config.salient_select, score, order)
    codes = encode(w, part, config.scale_mode, config.mean_mode)
    # Bits depend only on the shape and the salient positions, fixed from here on.
    bits = count_bits(
        dataclasses.replace(codes, col_scale=torch.ones(w.shape[1])) if config.col_scale else codes
    )
    return _Encoded(p_sal=float(p_sal), part=part, codes=codes, bits=bits, info={})


def _refine_candidate(
    w: torch.Tensor,
    h: torch.Tensor | None,
    enc: _Encoded,
    config: BiVLMConfig,
    iters: int | None = None,
) -> _Encoded:
    """ARB / ARB-X refinement of an encoded candidate: ``iters`` more iterations (default
    ``config.refine_iters``). Refinement is a deterministic loop on the codes, so k iterations
    then m more are exactly k + m iterations; ``refine_errors`` holds the whole history."""
    iters = config.refine_iters if iters is None else iters
    if not iters:
        return enc
    res = refine(
        w,
        enc.codes,
        h if config.refine_weighted else None,
        iters,
        part=enc.part,
        assign=config.assign,
        percdamp=config.percdamp,
        row_err=enc.row_err,
    )
    errors = enc.info.get("refine_errors", ())[:-1] + res.errors
    info = {**enc.info, "refine_errors": errors}
    return dataclasses.replace(enc, codes=res.codes, info=info, row_err=res.row_errors)


def _finish_candidate(
    w: torch.Tensor,
    h: torch.Tensor | None,
    hinv: torch.Tensor | None,
    dead: torch.Tensor | None,
    enc: _Encoded,
    config: BiVLMConfig,
    order: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Candidate:
    """Compensation, refit and fp16 rounding of a refined candidate, and its final error.

    ``order``: ``(perm, hinv of H[perm][:, perm])`` for an act-order compensation pass.
    """
    codes, info = enc.codes, dict(enc.info)
    if config.compensate and hinv is not None:
        w_live = _zero_dead(w, dead)
        perm, hinv_pass = (None, hinv) if order is None else order
        comp = _compensate(w_live, codes, hinv_pass, enc.part, config, perm)
        if config.refit_iters:
            comp = refit(w_live, comp, h, config.refit_iters, config.percdamp)
        # GPTQ's greedy pass with a frozen 1-bit grid is not guaranteed to lower tr(R H R^T)
        # (it can raise it on rank-deficient calibration Hessians); keep the better codes.
        err_comp = layer_error(w, dequantize(comp), h)
        info["compensated"] = err_comp <= layer_error(w, dequantize(codes), h)
        if info["compensated"]:
            codes = comp
    if config.fp16_params:
        codes = round_params_fp16(codes)
    error = layer_error(w, dequantize(codes), h)
    return _Candidate(p_sal=enc.p_sal, codes=codes, bits=enc.bits, error=error, info=info)


@dataclass(frozen=True)
class _Problem:
    """One layer as the pipeline sees it.

    ``w`` / ``h`` are the weight and Hessian the steps run on: the layer's own (``w0`` / ``h0``)
    or, with column scales ``c``, W diag(1/c) and diag(c) H diag(c) (the same error).
    """

    w: torch.Tensor
    h: torch.Tensor | None
    hinv: torch.Tensor | None
    dead: torch.Tensor | None
    w0: torch.Tensor
    h0: torch.Tensor | None
    c: torch.Tensor | None
    order: tuple[torch.Tensor, torch.Tensor] | None = None


def _prepare(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: BiVLMConfig | None
) -> tuple[BiVLMConfig, _Problem]:
    config = BiVLMConfig() if config is None else config
    if not isinstance(config, BiVLMConfig):
        raise ValueError(f"config must be a BiVLMConfig, got {type(config).__name__}")
    _check_inputs(weight, hessian)
    w0 = weight.detach().to(torch.float32)
    h0 = None if hessian is None else hessian.detach().to(w0.device, torch.float32)
    w, h, c = w0, h0, None
    if config.col_scale:
        c = initial_col_scale(w0, config.fp16_params)
        w = w0 / c
        h = None if h0 is None else h0 * c.unsqueeze(0) * c.unsqueeze(1)
    hinv = dead = None
    if h is not None and (config.compensate or config.salient_metric == "hessian"):
        hinv, dead = inverse_cholesky(h, config.percdamp)
    order = None
    if h is not None and config.compensate and config.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        order = (perm, inverse_cholesky(h[perm][:, perm], config.percdamp)[0])
    return config, _Problem(w=w, h=h, hinv=hinv, dead=dead, w0=w0, h0=h0, c=c, order=order)


def _with_col_scale(prob: _Problem, out: _Candidate, config: BiVLMConfig) -> _Candidate:
    """A candidate of the (column-scaled) problem mapped back to the layer's own weight."""
    if prob.c is None:
        return out
    q = dequantize(out.codes)  # the codes without column scales
    c, error = prob.c, layer_error(prob.w0, q * prob.c, prob.h0)
    solved = solve_col_scale([prob.w0], [q], [prob.h0], prob.c, config.percdamp)
    if config.fp16_params:
        fp16_max = torch.finfo(torch.float16).max
        solved = solved.clamp(-fp16_max, fp16_max).half().float()
    err_solved = layer_error(prob.w0, q * solved, prob.h0)
    resolved = bool(torch.isfinite(solved).all()) and err_solved < error
    if resolved:
        c, error = solved, err_solved
    codes = dataclasses.replace(out.codes, col_scale=c)
    info = {**out.info, "col_scale_resolved": resolved}
    return _Candidate(p_sal=out.p_sal, codes=codes, bits=out.bits, error=error, info=info)


def _encode_all(prob: _Problem, shares: tuple[float, ...], config: BiVLMConfig) -> list[_Encoded]:
    """Every share's partition and closed-form codes on the problem, in ``shares`` order."""
    score = _saliency(prob.w, prob.hinv, config, prob.dead)
    order = saliency_ranking(score) if len(shares) > 1 else None  # one sort for every share
    return [_encode_candidate(prob.w, score, p, config, order) for p in shares]


def _finish(prob: _Problem, enc: _Encoded, config: BiVLMConfig, refined: int = 0) -> _Candidate:
    """The rest of the pipeline on an encoded candidate (``refined`` refinement iterations
    already done), mapped back to the layer's own weight."""
    enc = _refine_candidate(prob.w, prob.h, enc, config, config.refine_iters - refined)
    done = _finish_candidate(prob.w, prob.h, prob.hinv, prob.dead, enc, config, prob.order)
    return _with_col_scale(prob, done, config)


def _search_cheaply(
    prob: _Problem, fits: list[_Encoded], config: BiVLMConfig
) -> tuple[_Candidate, dict[float, float]]:
    """The candidate of least proxy error, then the rest of the pipeline on it alone.

    The proxy is tr(R H R^T) (Frobenius without H) of the closed-form codes
    (``candidate_search="encoded"``) or of the codes after one refinement iteration
    (``"refined"``; the winner goes on from there); shares in ``fits`` are already within the
    budget. Returns the finished winner and every proxy error.
    """
    first = _cheap_iters(config)
    scored = [_score_cheaply(prob, e, config, first) for e in fits]
    best = min(scored, key=lambda s: s[1])[0]
    return _finish(prob, best, config, first), {e.p_sal: err for e, err in scored}


def _cheap_iters(config: BiVLMConfig) -> int:
    """Refinement iterations a cheap search runs before it compares candidates."""
    return min(config.refine_iters, 1) if config.candidate_search == "refined" else 0


def _score_cheaply(
    prob: _Problem, enc: _Encoded, config: BiVLMConfig, iters: int
) -> tuple[_Encoded, float]:
    """``enc`` after ``iters`` refinement iterations and its proxy error tr(R H R^T)
    (Frobenius without H) on the problem."""
    enc = _refine_candidate(prob.w, prob.h, enc, config, iters)
    if enc.row_err is not None and (config.refine_weighted or prob.h is None):
        return enc, float(enc.row_err.sum())  # the refinement's own tr(R H R^T)
    return enc, layer_error(prob.w, dequantize(enc.codes), prob.h)


def _result(
    w: torch.Tensor,
    h: torch.Tensor | None,
    best: _Candidate,
    extra: dict,
    ref: float | None = None,
) -> QuantResult:
    """``best`` as a ``QuantResult``; ``ref``: tr(W H W^T) if the caller has it."""
    w_hat = dequantize(best.codes)
    ref = layer_error(w, torch.zeros_like(w), h) if ref is None else ref
    info: dict[str, Any] = {
        "p_sal": best.p_sal,
        "n_rings": best.codes.n_rings,
        "relative_error": best.error / ref if ref > 0 else 0.0,
        "frobenius_error": layer_error(w, w_hat, None),
        **extra,
        **best.info,
    }
    return QuantResult(
        w_hat=w_hat,
        bits=best.bits,
        error=best.error if h is not None else None,
        codes=best.codes,
        info=info,
    )


@dataclass(frozen=True)
class LayerCandidates:
    """One layer's candidates for an allocator (``core.allocate``): their bits and errors now,
    any one of them finished on request.

    ``options[i]`` is ``(storage_bits, error, relative_error)`` of candidate ``i`` (shares in
    the inner loop, ring counts in the outer one; ``keys[i]`` is its ``(p_sal, n_rings)``).
    With ``candidate_search="full"`` the errors are the finished candidates' tr(R H R^T)
    (Frobenius without H) and ``finish`` returns the stored result; with ``"encoded"`` /
    ``"refined"`` they are the proxy errors of ``quantize_bivlm``'s cheap search and only the
    candidate ``finish`` is called on runs the rest of the pipeline (its codes are exactly
    ``quantize_bivlm``'s at that share and ring count). ``relative_error`` is the error over
    tr(W H W^T).

    Until finished, a cheap search holds the layer's Hessian factors and every candidate's
    codes (an (in, in) inverse factor, twice with ``act_order``).
    """

    keys: tuple[tuple[float, int], ...]
    options: tuple[tuple[float, float, float], ...]
    search: str
    _finish: Any = dataclasses.field(repr=False)

    def finish(self, index: int) -> QuantResult:
        """Candidate ``index`` run to the end: its ``QuantResult`` (``info["candidate_search"]``
        names how it was compared)."""
        if not 0 <= index < len(self.options):
            raise IndexError(f"candidate {index} of {len(self.options)}")
        return self._finish(index)


def bivlm_candidates(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: BiVLMConfig | None = None,
    n_rings_options: tuple[int, ...] | None = None,
) -> LayerCandidates:
    """Every candidate of one layer (per salient share and ring count), compared as
    ``config.candidate_search`` says; ``config.bit_budget`` is not applied (the caller
    allocates). See ``LayerCandidates``."""
    config, prob = _prepare(weight, hessian, config)
    rings = tuple(n_rings_options) if n_rings_options else (config.n_rings,)
    for r in rings:
        _int_at_least("n_rings_options[...]", r, 1)
    shares = config.p_sal_candidates or (config.p_sal,)
    ref = layer_error(prob.w0, torch.zeros_like(prob.w0), prob.h0)
    cheap = config.candidate_search != "full"
    first = _cheap_iters(config)
    staged: list[tuple[BiVLMConfig, _Encoded]] = []
    done: list[QuantResult] = []
    errors: list[float] = []
    bits: list[float] = []
    for r in rings:
        cfg = config if r == config.n_rings else dataclasses.replace(config, n_rings=r)
        for enc in _encode_all(prob, shares, cfg):
            if cheap:
                enc, err = _score_cheaply(prob, enc, cfg, first)
                staged.append((cfg, enc))
                errors.append(err)
            else:
                # Keep the codes, not the dense weights (a 7B MLP's are 180 MB each).
                res = _result(prob.w0, prob.h0, _finish(prob, enc, cfg), {}, ref)
                done.append(dataclasses.replace(res, w_hat=None))
                errors.append(res.error if res.error is not None else res.info["frobenius_error"])
            bits.append(enc.bits.storage_bits)
    keys = tuple((float(p), r) for r in rings for p in shares)
    options = tuple((b, e, e / ref if ref > 0 else 0.0) for b, e in zip(bits, errors, strict=True))

    def finish(i: int) -> QuantResult:
        extra = {"candidate_search": config.candidate_search}
        if not cheap:
            res = done[i]
            return dataclasses.replace(res, w_hat=dequantize(res.codes), info={**res.info, **extra})
        cfg, enc = staged[i]
        return _result(prob.w0, prob.h0, _finish(prob, enc, cfg, first), extra, ref)

    return LayerCandidates(keys, options, config.candidate_search, finish)


def bivlm_options(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    config: BiVLMConfig | None = None,
    n_rings_options: tuple[int, ...] | None = None,
) -> list[QuantResult]:
    """Every candidate of one layer, fully quantized: one per salient share and ring count.

    The shares are ``config.p_sal_candidates`` (or ``(config.p_sal,)``), the ring counts
    ``n_rings_options`` (or ``(config.n_rings,)``); ``config.bit_budget`` is not applied (the
    caller allocates, e.g. ``core.allocate``). Each result's ``info`` holds ``p_sal``,
    ``n_rings`` and ``relative_error`` (error over tr(W H W^T)), by which a model-wide
    allocation compares layers.

    Returns:
        ``QuantResult`` per candidate, shares in the inner loop, ring counts in the outer one.
    """
    config = BiVLMConfig() if config is None else config
    if isinstance(config, BiVLMConfig):
        config = dataclasses.replace(config, candidate_search="full")
    cands = bivlm_candidates(weight, hessian, config, n_rings_options)
    return [cands.finish(i) for i in range(len(cands.options))]


@register_method("bivlm", BiVLMConfig)
def quantize_bivlm(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: BiVLMConfig | None = None
) -> QuantResult:
    """Quantize one linear weight with Bi-VLM.

    Args:
        weight: (out, in) float weight (any float dtype; computed in float32).
        hessian: (in, in) H = 2 X^T X / n of the layer inputs, or None (then no compensation,
            unweighted refinement, magnitude saliency).
        config: a ``BiVLMConfig`` (defaults when None).

    Returns:
        ``QuantResult`` with w_hat (out, in) float32, the bit count, error tr(R H R^T) (None
        without H), the ``BinaryCodes`` and ``info`` (chosen p_sal, n_rings, per-candidate bits
        and errors, relative error).

    Raises:
        ValueError: bad shapes or values, or no candidate fits ``bit_budget`` (the message
            names the smallest achievable storage bits).
    """
    config, prob = _prepare(weight, hessian, config)
    w, h = prob.w0, prob.h0
    candidates = config.p_sal_candidates or (config.p_sal,)
    runs: list[_Candidate] = []
    over: list[tuple[float, BitCount]] = []
    proxy: dict[float, float] | None = None
    fits: list[_Encoded] = []
    for enc in _encode_all(prob, candidates, config):
        if config.bit_budget is not None and enc.bits.storage_bits > config.bit_budget:
            over.append((enc.p_sal, enc.bits))
        else:
            fits.append(enc)
    if config.candidate_search == "full" or len(candidates) == 1:
        runs = [_finish(prob, enc, config) for enc in fits]
    elif fits:
        best_run, proxy = _search_cheaply(prob, fits, config)
        runs.append(best_run)
    if not runs:
        best_p, best_bits = min(over, key=lambda pb: pb[1].storage_bits)
        raise ValueError(
            f"no salient share in {tuple(candidates)} fits bit_budget={config.bit_budget} "
            f"storage bits per weight for weight {tuple(w.shape)} with n_rings="
            f"{config.n_rings}; the smallest achievable is {best_bits.storage_bits:.4f} bits "
            f"(p_sal={best_p}). Raise bit_budget, add smaller p_sal candidates, or use fewer rings."
        )
    best = min(runs, key=lambda c: c.error)
    if proxy is None:
        searched = {c.p_sal: {"storage_bits": c.bits.storage_bits, "error": c.error} for c in runs}
    else:  # only the winner has a final error; every fitting share has its proxy error
        searched = {
            e.p_sal: {"storage_bits": e.bits.storage_bits, "proxy_error": proxy[e.p_sal]}
            for e in fits
        }
        searched[best.p_sal]["error"] = best.error
    extra = {
        "candidates": searched,
        "candidate_search": config.candidate_search if proxy is not None else "full",
        "over_budget": {p: b.storage_bits for p, b in over},
    }
    logger.debug("bivlm %s: p_sal=%s bits=%.4f", tuple(w.shape), best.p_sal, best.bits.storage_bits)
    return _result(w, h, best, extra)
