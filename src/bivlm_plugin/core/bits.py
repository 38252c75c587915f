"""Honest bit accounting of a binarized layer (DESIGN.md section 2).

Storage of one layer, as ``format/`` will save it:

- ``signs``: dense sign plane, 1 bit per weight (B for inliers, B1 for salient weights).
- ``ring``: dense ring-index plane, ceil(log2 N) bits per weight (nothing when N = 1).
- ``salient_idx``: per-row column indices of salient weights, uint8 when in <= 256 else int16.
- ``salient_count``: per-row counts as int16, or a single int16 k when every row holds k.
- ``salient_sign2``: the sparse second plane, 1 bit per salient weight.
- ``alpha_ring``, ``alpha_sal``, ``mu``: every scale and mean as fp16. Salient scales and
  counts vanish when the layer has no salient weight.
- ``col_scale`` (only with ``BiVLMConfig.col_scale``): one fp16 per input column.

*weight bits* (the BiLLM / ARB-LLM convention) count the binary planes only:
1 per weight + 1 per salient weight.
"""

from __future__ import annotations

import math

from .binarize import BinaryCodes
from .types import BitCount

__all__ = ["FP16_BITS", "count_bits", "index_bits", "ring_index_bits"]

FP16_BITS = 16
_COUNT_BITS = 16


def ring_index_bits(n_rings: int) -> int:
    """ceil(log2(N)) bits per weight for the ring plane (0 for N = 1)."""
    if n_rings < 1:
        raise ValueError(f"n_rings must be >= 1, got {n_rings}")
    return math.ceil(math.log2(n_rings)) if n_rings > 1 else 0


def index_bits(in_features: int) -> int:
    """Bits of one stored salient column index: 8 (uint8) when in <= 256, else 16 (int16)."""
    if in_features <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if in_features > 2**15:
        raise ValueError(
            f"in_features={in_features} does not fit int16 column indices (<= 32768); "
            "split the layer along its input dimension"
        )
    return 8 if in_features <= 256 else 16


def count_bits(codes: BinaryCodes) -> BitCount:
    """Count the stored bits of ``codes`` per component.

    Args:
        codes: the layer's ``BinaryCodes``.

    Returns:
        ``BitCount`` with ``weight_bits`` (binary planes only), ``storage_bits`` (every stored
        bit per weight) and a ``breakdown`` of total bits per component.
    """
    out_f, in_f = codes.shape
    n_weights = out_f * in_f
    n_sal = int(codes.salient_counts.sum())
    breakdown: dict[str, int] = {
        "signs": n_weights,
        "ring": n_weights * ring_index_bits(codes.n_rings),
        "alpha_ring": codes.alpha_ring.numel() * FP16_BITS,
        "mu": codes.mu.numel() * FP16_BITS,
    }
    if n_sal > 0:
        breakdown["salient_idx"] = n_sal * index_bits(in_f)
        breakdown["salient_count"] = _COUNT_BITS if codes.fixed_k else out_f * _COUNT_BITS
        breakdown["salient_sign2"] = n_sal
        breakdown["alpha_sal"] = codes.alpha_sal.numel() * FP16_BITS
    else:
        breakdown.update(salient_idx=0, salient_count=0, salient_sign2=0, alpha_sal=0)
    if codes.col_scale is not None:
        breakdown["col_scale"] = in_f * FP16_BITS
    return BitCount.from_breakdown(n_weights, plane_bits=n_weights + n_sal, breakdown=breakdown)
