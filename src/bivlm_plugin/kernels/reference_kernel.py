"""Kernels built from the reference math: the oracle itself, and dequantize-then-GEMM.

``DequantGemmKernel`` is the prefill path: for many rows of activations, rebuilding the dense
weight once per call (O * I work) and calling the dense GEMM beats any sign-GEMV kernel, whose
work grows with rows * O * I / 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bivlm_plugin.format.codes import dequantize_packed

from .chooser import register_kernel
from .reference import binary_linear_reference

__all__ = ["DequantGemmKernel", "ReferenceKernel"]


@register_kernel
class ReferenceKernel:
    name = "reference"
    priority = 0

    @classmethod
    def can_implement(cls, x, layout) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def run(cls, x, packed, layout, bias):
        return binary_linear_reference(x, packed, layout, bias)


@register_kernel
class DequantGemmKernel:
    name = "dequant_gemm"
    priority = 5

    @classmethod
    def can_implement(cls, x, layout) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def run(cls, x, packed, layout, bias):
        if x.dtype == torch.float32:
            return binary_linear_reference(x, packed, layout, bias)
        w = None
        if x.device.type == "cpu" and layout.n_rings <= 4:
            from .cpu import CpuKernel, load_extension

            mod = load_extension()  # None (reason logged once) when it cannot be built
            if mod is not None:
                args = CpuKernel.arguments(packed, layout, None)[:-2]  # no bias, no n_rings
                w = mod.dequantize_cpu(
                    *args, layout.in_features, layout.n_rings, x.dtype == torch.bfloat16
                )
        if w is None:
            w = dequantize_packed(packed, layout)
        w = w.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
