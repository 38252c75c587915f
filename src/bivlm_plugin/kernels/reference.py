"""The slow, obviously correct binary linear every fast kernel is tested against.

Non-goals: speed (it dequantizes the whole weight on every call).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bivlm_plugin.format.codes import dequantize_packed
from bivlm_plugin.format.layout import BivlmLayout

__all__ = ["binary_linear_reference"]


def binary_linear_reference(
    x: torch.Tensor,
    packed: Mapping[str, torch.Tensor],
    layout: BivlmLayout,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias), computed in float32 and cast to x's dtype.

    Args:
        x: (..., I) activations of any float dtype.
        packed: the layer's packed tensors; layout: their layout.
        bias: optional (O,) bias.

    Returns:
        (..., O) in x.dtype.
    """
    if x.shape[-1] != layout.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} input features, the layer expects {layout.in_features}"
        )
    w = dequantize_packed(packed, layout).to(x.device)
    y = x.reshape(-1, layout.in_features).to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], layout.out_features)
