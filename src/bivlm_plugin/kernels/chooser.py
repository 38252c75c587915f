"""Kernel registry and chooser for ``bivlm::binary_linear``.

Every kernel is a class with ``name``, ``can_implement(x, layout) -> (ok, reason)`` and
``run(x2d, packed, layout, bias) -> y2d``. ``choose_kernel`` walks the registry in priority
order (fastest first) and logs at debug level why each faster kernel declined. The environment
variable ``BIVLM_KERNEL=reference|cpu|triton`` forces one (ValueError when it cannot run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

import torch

from bivlm_plugin.format.layout import BivlmLayout

__all__ = ["BinaryLinearKernel", "available_kernels", "choose_kernel", "register_kernel"]

logger = logging.getLogger(__name__)

ENV_VAR = "BIVLM_KERNEL"


class BinaryLinearKernel(Protocol):
    name: str
    priority: int

    @classmethod
    def can_implement(cls, x: torch.Tensor, layout: BivlmLayout) -> tuple[bool, str]: ...

    @classmethod
    def run(
        cls,
        x: torch.Tensor,
        packed: Mapping[str, torch.Tensor],
        layout: BivlmLayout,
        bias: torch.Tensor | None,
    ) -> torch.Tensor: ...


_KERNELS: dict[str, type[BinaryLinearKernel]] = {}


def register_kernel(cls: type[BinaryLinearKernel]) -> type[BinaryLinearKernel]:
    """Class decorator: add a kernel to the registry (idempotent by name)."""
    _KERNELS[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the modules registers their kernels; none of them builds or imports triton here.
    from . import cpu, reference_kernel, triton_kernel  # noqa: F401


def available_kernels() -> list[type[BinaryLinearKernel]]:
    """Registered kernels, fastest (highest priority) first."""
    _load_builtin()
    return sorted(_KERNELS.values(), key=lambda k: -k.priority)


def choose_kernel(x: torch.Tensor, layout: BivlmLayout) -> type[BinaryLinearKernel]:
    """The fastest kernel that can run ``x`` on ``layout`` (or the one ``BIVLM_KERNEL`` forces)."""
    kernels = available_kernels()
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced:
        by_name = {k.name: k for k in kernels}
        if forced not in by_name:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a kernel; choose from {sorted(by_name)}")
        ok, reason = by_name[forced].can_implement(x, layout)
        if not ok:
            raise ValueError(
                f"{ENV_VAR}={forced!r} cannot run this call: {reason}; unset {ENV_VAR} to let "
                "the chooser pick"
            )
        return by_name[forced]
    for kernel in kernels:
        ok, reason = kernel.can_implement(x, layout)
        if ok and hasattr(kernel, "worthwhile"):
            # Capability is not enough: a GEMV kernel loses to dequantize-then-GEMM on many rows.
            ok, reason = kernel.worthwhile(x, layout)
        if ok:
            return kernel
        logger.debug("kernel %s declined: %s", kernel.name, reason)
    raise RuntimeError("no binary linear kernel can run this call (the reference always should)")
