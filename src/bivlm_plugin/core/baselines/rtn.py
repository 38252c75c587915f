"""RTN sign binarization: the floor every 1-bit method must beat.

W_hat = alpha * sign(W - mu) + mu per output row, with alpha = mean |W - mu| over the row (the
L2-optimal scale for a fixed sign plane, XNOR-Net / BWN) and mu the row mean when
``per_row_mean`` is set (0 otherwise). This is the "RTN" 1-bit row of the BiLLM and ARB-LLM
tables: no Hessian, no grouping, no compensation.

Storage layout counted (DESIGN.md section 2):
    * ``sign_plane``: 1 bit per weight (out * in).
    * ``row_scale``: one fp16 alpha per row (out * 16 bits).
    * ``row_mean``: one fp16 mu per row when ``per_row_mean`` (out * 16 bits).

Storage bits per weight = 1 + 16 / in (+ 16 / in with the mean): 1.028 (1.056) at in = 576 and
1.010 (1.021) at in = 1536. Weight bits (the papers' convention, planes only) = 1.0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bivlm_plugin.core.baselines._common import (
    FP16_BITS,
    check_hessian,
    check_weight,
    error_or_none,
)
from bivlm_plugin.core.types import BitCount, QuantResult, register_method

__all__ = ["RtnSignConfig", "binarize_rtn_sign", "quantize_rtn_sign"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RtnSignConfig:
    """Config of ``rtn_sign``.

    Attributes:
        per_row_mean: subtract a per-row mean before taking signs (and store it, fp16).
    """

    per_row_mean: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.per_row_mean, bool):
            raise ValueError(
                f"RtnSignConfig.per_row_mean must be a bool, got {self.per_row_mean!r}"
            )


def binarize_rtn_sign(
    weight: torch.Tensor, per_row_mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sign binarization.

    Args:
        weight: (out, in) float32.
        per_row_mean: centre each row on its mean first.

    Returns:
        (w_hat (out, in), signs (out, in) in {-1, +1}, alpha (out,), mu (out,)); mu is zeros
        without ``per_row_mean``.
    """
    mu = weight.mean(dim=1) if per_row_mean else torch.zeros_like(weight[:, 0])
    centred = weight - mu[:, None]
    alpha = centred.abs().mean(dim=1)
    signs = torch.where(centred >= 0, 1.0, -1.0).to(weight.dtype)
    return alpha[:, None] * signs + mu[:, None], signs, alpha, mu


@register_method("rtn_sign", RtnSignConfig)
def quantize_rtn_sign(
    weight: torch.Tensor, hessian: torch.Tensor | None, config: RtnSignConfig
) -> QuantResult:
    """Binarize ``weight`` row by row; report tr(R H R^T) when a Hessian is given.

    Args:
        weight: (out, in) float weight.
        hessian: (in, in) Hessian or None (it only scores the result).
        config: an ``RtnSignConfig``.

    Returns:
        QuantResult with w_hat (out, in) float32 and the honest bit count.
    """
    if not isinstance(config, RtnSignConfig):
        raise ValueError(f"rtn_sign: config must be an RtnSignConfig, got {type(config).__name__}")
    w = check_weight(weight, "rtn_sign")
    h = check_hessian(hessian, w.shape[1], "rtn_sign")
    w_hat, _, alpha, _ = binarize_rtn_sign(w, config.per_row_mean)
    out, n_in = w.shape
    breakdown = {"sign_plane": out * n_in, "row_scale": out * FP16_BITS}
    if config.per_row_mean:
        breakdown["row_mean"] = out * FP16_BITS
    bits = BitCount.from_breakdown(out * n_in, out * n_in, breakdown)
    logger.debug("rtn_sign %dx%d: %.4f storage bits", out, n_in, bits.storage_bits)
    return QuantResult(
        w_hat=w_hat,
        bits=bits,
        error=error_or_none(w, w_hat, h),
        info={"mean_alpha": float(alpha.mean())},
    )
