"""Helpers shared by the baseline binarizers: masked statistics, input checks, the block loop.

Everything here is private to ``core.baselines``: plain tensors in, tensors out. The masked
statistics reproduce the ``torch.nanmean`` idiom of the BiLLM / ARB-LLM research code (entries
outside the mask are ignored; an empty mask gives 0, not NaN) without building NaN tensors, and
they broadcast over leading "candidate" dimensions so the searches can score many candidate
masks in one pass.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import torch

from bivlm_plugin.core.checks import require_finite
from bivlm_plugin.core.compensate import gptq_compensate, output_error
from bivlm_plugin.core.hessian import inverse_cholesky

__all__ = [
    "FP16_BITS",
    "masked_mean",
    "sign_pm",
    "quantiles",
    "check_weight",
    "check_hessian",
    "BlockFn",
    "run_blockwise",
    "error_or_none",
    "candidate_chunk",
    "safe_div",
]

FP16_BITS = 16
"""Every scale and mean is stored as fp16 (DESIGN.md section 2)."""

_EPS = 1e-8


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true along ``dim`` (0 where empty).

    Args:
        x: (..., out, b) float values; broadcasts against ``mask``.
        mask: (..., out, b) bool.
        dim: reduction dimension (-1: per row, -2: per column).

    Returns:
        The reduced float tensor, with ``dim`` removed.
    """
    m = mask.to(x.dtype)
    count = m.sum(dim)
    total = (x * m).sum(dim)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


def sign_pm(x: torch.Tensor) -> torch.Tensor:
    """Sign in {-1, +1} (0 maps to +1): a stored binary plane has no zero state.

    The research code uses ``torch.sign`` and so leaves an entry that sits exactly on its mean at
    the mean; with real weights this has probability zero, but a packed plane needs a bit.
    """
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles of a flat tensor (``numpy.quantile``'s default method).

    ``torch.quantile`` refuses inputs above 2**24 elements; a sort has no such limit.

    Args:
        values: (n,) float.
        q: (k,) float in [0, 1].

    Returns:
        (k,) float quantiles.
    """
    v, _ = torch.sort(values.reshape(-1).to(torch.float64))
    n = v.numel()
    pos = q.to(torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.to(torch.float64)
    return (v[lo] + (v[hi] - v[lo]) * frac).to(values.dtype)


def candidate_chunk(rows: int, cols: int, budget: int = 1 << 23) -> int:
    """How many (rows, cols) candidate masks to score at once within ``budget`` elements."""
    return max(1, budget // max(1, rows * cols))


def check_weight(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Validate a (out, in) weight and return it as float32."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{method}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(
            f"{method}: weight must be a non-empty 2-D (out, in) matrix, got shape "
            f"{tuple(weight.shape)}; flatten conv kernels to (out, in*k*k) first"
        )
    if not weight.is_floating_point():
        raise ValueError(f"{method}: weight must be floating point, got dtype {weight.dtype}")
    w = weight.detach().to(torch.float32)
    require_finite(
        w,
        f"{method}: weight",
        "quantize a finite weight (check the checkpoint: a diverged fine-tune or an fp16 "
        "overflow leaves NaN / inf)",
    )
    return w


def check_hessian(
    hessian: torch.Tensor | None, in_features: int, method: str
) -> torch.Tensor | None:
    """Validate an optional (in, in) Hessian and return it as float32."""
    if hessian is None:
        return None
    if not isinstance(hessian, torch.Tensor):
        raise ValueError(
            f"{method}: hessian must be a torch.Tensor or None, got {type(hessian).__name__}"
        )
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"{method}: hessian shape {tuple(hessian.shape)} does not match the weight's "
            f"in_features={in_features}; accumulate it from this layer's inputs "
            "(HessianAccumulator(in_features))"
        )
    h = hessian.detach().to(torch.float32)
    require_finite(
        h,
        f"{method}: hessian",
        "check the calibration inputs (NaN / inf activations, e.g. an fp16 overflow in the model)",
    )
    return h


BlockFn = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, Counter]]
"""(w_block (out, b), hinv_block (b, b), col0) -> (w_hat_block (out, b), stored bits by name)."""


def run_blockwise(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    block_fn: BlockFn,
    *,
    block_size: int,
    compensate: bool,
    percdamp: float,
    faithful: bool = True,
) -> tuple[torch.Tensor, Counter[str], int]:
    """Run a block quantizer over the columns, with or without GPTQ / OBC compensation.

    Mirrors ``BRAGPTQ.fasterquant`` of BiLLM (bigptq.py) and ARB-LLM (bigptq_arb.py): dead inputs
    (zero Hessian diagonal) get their weight columns zeroed, H is damped and its inverse's upper
    Cholesky factor feeds both the salient metric and the compensation; ``compensate=False`` is
    the research code's ``--disable_gptq`` path (blocks quantized as they are).

    Args:
        weight: (out, in) float32.
        hessian: (in, in) float32 or None (then the block quantizer sees an identity factor and
            ``compensate`` must be False).
        block_fn: the method's block quantizer, returning its block and its stored-bit tally.
        block_size: columns per block; the last block may be narrower.
        compensate: spread each block's error onto later columns (GPTQ).
        percdamp: Hessian damping, share of the mean diagonal.
        faithful: the research code's update (errors from the block as quantized, spread onto
            later blocks only); False also spreads each error inside its block
            (``gptq_compensate(in_block=True)``).

    Returns:
        (w_hat (out, in) float32, stored bits summed over blocks, number of blocks).
    """
    w = weight.clone()
    n_in = w.shape[1]
    if hessian is None:
        if compensate:
            raise ValueError("compensation needs a Hessian; pass one or set compensate=False")
        hinv = torch.eye(n_in, dtype=torch.float32, device=w.device)
    else:
        hinv, dead = inverse_cholesky(hessian, percdamp)
        w[:, dead] = 0.0
    tally: Counter[str] = Counter()
    n_blocks = math.ceil(n_in / block_size)

    def quantize_block(w_b: torch.Tensor, hinv_b: torch.Tensor, col0: int) -> torch.Tensor:
        q_b, bits = block_fn(w_b, hinv_b, col0)
        tally.update(bits)
        return q_b

    if compensate:
        w_hat = gptq_compensate(w, hinv, quantize_block, block_size, in_block=not faithful)
    else:
        w_hat = torch.empty_like(w)
        for c0 in range(0, n_in, block_size):
            c1 = min(c0 + block_size, n_in)
            w_hat[:, c0:c1] = quantize_block(w[:, c0:c1].clone(), hinv[c0:c1, c0:c1], c0)
    return w_hat, tally, n_blocks


def error_or_none(
    weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None
) -> float | None:
    """tr(R H R^T) against the undamped Hessian, or None without one."""
    return None if hessian is None else output_error(weight, w_hat, hessian)


def safe_div(num: torch.Tensor, den: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """``num / (den + eps)`` as the research code writes its least-squares updates."""
    return num / (den + eps)
