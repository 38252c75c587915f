"""``bivlm::binary_linear``: the custom op integrations call, with a fake (meta) impl.

The op takes the packed tensors one by one (custom ops cannot take dicts or layouts); the layout
is recovered from their shapes plus ``in_features``. Its body asks ``choose_kernel`` for the
fastest kernel that can run the call. Importing this module registers the op (and nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bivlm_plugin.format.layout import BivlmLayout

from .chooser import choose_kernel

__all__ = ["binary_linear", "binary_linear_op"]

_OPTIONAL = ("rings", "salient_idx", "salient_scales", "salient_sign2", "salient_count")


def _packed(
    signs, rings, scales, mean, salient_idx, salient_scales, salient_sign2, salient_count
) -> dict[str, torch.Tensor]:
    packed = {"signs": signs, "scales": scales, "mean": mean}
    for name, t in zip(
        _OPTIONAL, (rings, salient_idx, salient_scales, salient_sign2, salient_count), strict=True
    ):
        if t is not None:
            packed[name] = t
    return packed


@torch.library.custom_op("bivlm::binary_linear", mutates_args=())
def binary_linear_op(
    x: torch.Tensor,
    signs: torch.Tensor,
    rings: torch.Tensor | None,
    scales: torch.Tensor,
    mean: torch.Tensor,
    salient_idx: torch.Tensor | None,
    salient_scales: torch.Tensor | None,
    salient_sign2: torch.Tensor | None,
    salient_count: torch.Tensor | None,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """(..., I) x -> (..., O) in x.dtype; see ``binary_linear``."""
    packed = _packed(
        signs, rings, scales, mean, salient_idx, salient_scales, salient_sign2, salient_count
    )
    layout = BivlmLayout.from_packed(packed, in_features)
    x2 = x.reshape(-1, in_features)
    y = choose_kernel(x2, layout).run(x2, packed, layout, bias)
    return y.reshape(*x.shape[:-1], layout.out_features)


@binary_linear_op.register_fake
def _(
    x,
    signs,
    rings,
    scales,
    mean,
    salient_idx,
    salient_scales,
    salient_sign2,
    salient_count,
    bias,
    in_features,
):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], signs.shape[0]))


def binary_linear(
    x: torch.Tensor,
    packed: Mapping[str, torch.Tensor],
    layout: BivlmLayout,
    bias: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias) for a packed layer, through ``bivlm::binary_linear``.

    Args:
        x: (..., I) float32 / bfloat16 / float16 activations.
        packed: tensors of ``layout`` (see ``format/layout.py``).
        bias: optional (O,) bias.
        cache: a dict the caller keeps per layer. In eager CPU calls with few rows the CPU
            kernel is then called directly with arguments prepared once, skipping the op's
            per-call Python; rebuilt when the signs storage changes (``.to()``,
            ``load_state_dict(assign=True)``). In-place updates are seen as they are.

    Returns:
        (..., O) in x.dtype (accumulated in float32).
    """
    if x.shape[-1] != layout.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} input features, the layer expects {layout.in_features}"
        )
    if cache is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
        key = packed["signs"].data_ptr()
        if cache.get("key") != key:
            from .cpu import CpuKernel

            cache["key"], cache["cpu"] = key, CpuKernel.prepare(packed, layout)
        if cache["cpu"] is not None:
            y = cache["cpu"](x, bias)
            if y is not None:
                return y
    return binary_linear_op(
        x,
        packed["signs"],
        packed.get("rings"),
        packed["scales"],
        packed["mean"],
        packed.get("salient_idx"),
        packed.get("salient_scales"),
        packed.get("salient_sign2"),
        packed.get("salient_count"),
        bias,
        layout.in_features,
    )
