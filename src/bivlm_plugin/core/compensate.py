"""Block-wise GPTQ / OBC error compensation around any block quantizer.

The loop is shared by Bi-VLM and the baselines: each method supplies a callback that maps a
block of (already compensated) columns to its dequantized approximation; this module spreads the
quantization error of every column over the columns not yet quantized, using the upper Cholesky
factor of H^-1 (Frantar et al., GPTQ, Algorithm 1). Like BiLLM, the whole block is quantized
before its columns are compensated one by one, so a block quantizer may look at all of its
columns at once (column grouping, salient search, Gaussian statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["BlockQuantizer", "gptq_compensate", "output_error"]

BlockQuantizer = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(w_block (out, b) f32, hinv_block (b, b) slice of the upper factor, col0) -> w_hat (out, b)."""


def gptq_compensate(
    weight: torch.Tensor,
    hinv_upper: torch.Tensor,
    quantize_block: BlockQuantizer,
    block_size: int = 128,
    *,
    in_block: bool = True,
    column_wise: bool = False,
) -> torch.Tensor:
    """Quantize ``weight`` block by block, compensating each column's error on later columns.

    Args:
        weight: (out, in) weight, any float dtype (computed in float32).
        hinv_upper: (in, in) upper Cholesky factor of the damped inverse Hessian.
        quantize_block: the method's block quantizer (see ``BlockQuantizer``).
        block_size: columns per block; the last block may be narrower.
        in_block: also spread each column's error onto the later columns of its own block
            before the next column's error is taken (the exact OBC update for fixed codes).
            False is the BiLLM / ARB-LLM research code (``BRAGPTQ.fasterquant``): every
            column's error is taken against the block as it was quantized, and the block's
            errors are spread onto the columns after the block only.
        column_wise: GPTQ proper: ``quantize_block`` is called once per column, on that column
            as updated by the errors of the columns before it (block-wide statistics are then
            unavailable to the quantizer: for quantizers with a frozen grid, whose codes are an
            elementwise choice). Needs ``in_block``.

    Returns:
        (out, in) float32 dequantized weight W_hat.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if column_wise and not in_block:
        raise ValueError("column_wise=True re-chooses codes after in-block updates: needs in_block")
    w = weight.to(torch.float32).clone()
    n_cols = w.shape[1]
    if hinv_upper.shape != (n_cols, n_cols):
        raise ValueError(
            f"hinv_upper shape {tuple(hinv_upper.shape)} does not match weight columns {n_cols}"
        )
    w_hat = torch.empty_like(w)
    for c0 in range(0, n_cols, block_size):
        c1 = min(c0 + block_size, n_cols)
        hinv_b = hinv_upper[c0:c1, c0:c1]
        w_b = w[:, c0:c1].clone()
        if column_wise:  # each column's codes are picked in the loop below
            q_b = torch.empty_like(w_b)
        else:
            q_b = quantize_block(w_b, hinv_b, c0).to(torch.float32)
            if q_b.shape != w_b.shape:
                raise RuntimeError(
                    f"block quantizer returned shape {tuple(q_b.shape)}, "
                    f"expected {tuple(w_b.shape)}"
                )
        if in_block:
            err_b = torch.empty_like(w_b)
            for i in range(c1 - c0):
                if column_wise:  # on the column as updated by the errors before it
                    q = quantize_block(w_b[:, i : i + 1], hinv_b[i : i + 1, i : i + 1], c0 + i)
                    q_b[:, i] = q.to(torch.float32).reshape(-1)
                d = hinv_b[i, i]
                err = (w_b[:, i] - q_b[:, i]) / d
                w_b[:, i:] -= err.unsqueeze(1) * hinv_b[i, i:].unsqueeze(0)
                err_b[:, i] = err
        else:
            err_b = (w_b - q_b) / torch.diagonal(hinv_b).unsqueeze(0)
        w_hat[:, c0:c1] = q_b
        w[:, c1:] -= err_b @ hinv_upper[c0:c1, c1:]
    return w_hat


def output_error(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Hessian-weighted output error tr(R H R^T) with R = W - W_hat (a float)."""
    r = weight.to(torch.float32) - w_hat.to(torch.float32)
    return float(torch.einsum("oi,ij,oj->", r, hessian.to(torch.float32), r))
