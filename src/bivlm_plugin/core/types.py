"""Result types and the method registry shared by Bi-VLM and the baselines."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "BitCount",
    "QuantResult",
    "LayerQuantizer",
    "register_method",
    "get_method",
    "available_methods",
]


@dataclass(frozen=True)
class BitCount:
    """Bits of one quantized layer, counted two ways (DESIGN.md section 2).

    Attributes:
        n_weights: out * in of the layer.
        weight_bits: binary-plane bits per weight, the convention of BiLLM / ARB-LLM papers.
        storage_bits: every stored bit per weight: sign planes, ring / group indices or bitmaps,
            sparse salient positions and offsets, fp16 scales and means.
        breakdown: total stored bits per named component (sums to storage_bits * n_weights).
    """

    n_weights: int
    weight_bits: float
    storage_bits: float
    breakdown: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def from_breakdown(n_weights: int, plane_bits: int, breakdown: Mapping[str, int]) -> BitCount:
        """Build a count from total plane bits and a per-component breakdown of all stored bits."""
        if n_weights <= 0:
            raise ValueError(f"n_weights must be positive, got {n_weights}")
        total = int(sum(breakdown.values()))
        return BitCount(
            n_weights=n_weights,
            weight_bits=plane_bits / n_weights,
            storage_bits=total / n_weights,
            breakdown=dict(breakdown),
        )


@dataclass(frozen=True)
class QuantResult:
    """Outcome of quantizing one (out, in) weight.

    Attributes:
        w_hat: (out, in) float32 dequantized weight.
        bits: the bit count of the layer as it would be stored.
        error: Hessian-weighted output error tr(R H R^T), or None without a Hessian.
        codes: the method's packed-able representation (method-specific, e.g. ``BinaryCodes``),
            or None for methods with no packed format of ours.
        info: method-specific scalars for reports (chosen salient share, iterations...).
    """

    w_hat: torch.Tensor
    bits: BitCount
    error: float | None = None
    codes: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)


class LayerQuantizer(Protocol):
    def __call__(
        self, weight: torch.Tensor, hessian: torch.Tensor | None, config: Any
    ) -> QuantResult: ...


_METHODS: dict[str, tuple[LayerQuantizer, type]] = {}


def register_method(name: str, config_cls: type) -> Callable[[LayerQuantizer], LayerQuantizer]:
    """Register a layer quantizer and its (frozen dataclass) config under ``name``."""

    def deco(fn: LayerQuantizer) -> LayerQuantizer:
        if name in _METHODS and _METHODS[name][0] is not fn:
            raise ValueError(f"quantization method {name!r} is already registered")
        _METHODS[name] = (fn, config_cls)
        return fn

    return deco


def get_method(name: str) -> tuple[LayerQuantizer, type]:
    """Return (quantizer, config class) for a registered method name."""
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {sorted(_METHODS)}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)
