"""``BinaryLinear``: a linear layer that keeps a Bi-VLM layer packed and runs the kernels.

Its buffers are exactly the tensors of ``BivlmLayout.specs()`` (row-indexed, packed words), so
``state_dict()`` keys are ``<module>.signs``, ``<module>.scales``, ... as the checkpoint stores
them (``format/checkpoint.py``). The forward calls ``bivlm::binary_linear`` (the kernel chooser
picks the CPU / Triton / reference kernel). No dense weight exists at any time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from bivlm_plugin.format.layout import BivlmLayout

__all__ = ["BinaryLinear", "replace_with_binary_linear"]


class BinaryLinear(nn.Module):
    """y = x W_hat^T + b with W_hat held as packed Bi-VLM tensors.

    Args:
        layout: shape description of the packed layer.
        bias: whether the layer has a dense bias (a float parameter, as in nn.Linear).
        device: where the buffers are created (``"meta"`` before checkpoint loading).
        bias_dtype: dtype of the bias.
    """

    def __init__(
        self,
        layout: BivlmLayout,
        bias: bool = False,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        for name, spec in layout.specs().items():
            self.register_buffer(name, torch.zeros(spec.shape, dtype=spec.dtype, device=device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(layout.out_features, dtype=bias_dtype, device=device),
                requires_grad=False,
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(
        cls,
        packed: Mapping[str, torch.Tensor],
        layout: BivlmLayout,
        bias: torch.Tensor | None = None,
    ) -> BinaryLinear:
        """A module holding ``packed`` (validated against ``layout``) and an optional bias."""
        layout.validate(packed)
        dev = packed["signs"].device
        mod = cls(layout, bias=bias is not None, device="meta")
        for name, t in packed.items():
            setattr(mod, name, t.detach().clone())
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone().to(dev), requires_grad=False)
        return mod

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors, by layout name."""
        return {name: getattr(self, name) for name in self.layout.specs()}

    def storage_bytes(self) -> int:
        """Resident bytes of the packed tensors (bias excluded, as in storage bits), plus what the
        CPU kernel prepared from them once a forward ran (its salient plan: one int16 per
        salient weight, the size of ``salient_idx``)."""
        prepared = self.__dict__.get("_kernel_cache", {}).get("cpu")
        extra = prepared.extra_bytes if prepared is not None else 0
        return sum(t.numel() * t.element_size() for t in self.packed().values()) + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bivlm_plugin.kernels.ops import binary_linear

        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        cache = self.__dict__.setdefault("_kernel_cache", {})
        return binary_linear(x, self.packed(), self.layout, bias, cache)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in_features={lay.in_features}, out_features={lay.out_features}, "
            f"n_rings={lay.n_rings}, k={lay.k}, bias={self.bias is not None}"
        )


def replace_with_binary_linear(
    model: nn.Module,
    modules: Mapping[str, tuple[BivlmLayout, bool]],
    bias_dtype: torch.dtype | None = None,
) -> list[str]:
    """Swap every module named in ``modules`` for an empty (meta) ``BinaryLinear``.

    Raises ValueError when a name is missing from the model or its shape disagrees with the
    layout (a config / checkpoint mismatch), naming the module.
    """
    replaced = []
    for name, (layout, has_bias) in modules.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError as exc:
            raise ValueError(
                f"quantization_config names module {name!r}, which the model does not have; "
                "the checkpoint was written for another architecture"
            ) from exc
        shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if shape != layout.shape:
            raise ValueError(
                f"{name}: the model's layer is {shape}, the checkpoint's packed layout is "
                f"{layout.shape}"
            )
        setattr(parent, child, BinaryLinear(layout, has_bias, device="meta", bias_dtype=bias_dtype))
        replaced.append(name)
    return replaced
