"""The reference kernel as a registry entry (runs anywhere, slowest)."""

from __future__ import annotations

from .chooser import register_kernel
from .reference import binary_linear_reference

__all__ = ["ReferenceKernel"]


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
