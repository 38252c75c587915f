"""Conversion between core's ``BinaryCodes`` and the packed tensors of ``BivlmLayout``.

``pack`` is exact for codes whose scales and means are fp16 values (the quantizer rounds them
with ``core.binarize.round_params_fp16``); ring indices at salient positions are stored as 0.
Only fixed-k salient layouts (every row the same count, ``salient_select="topk"``) are packed
from codes; variable-k layouts arise only from ``shard_columns`` / ``fuse_rows``.

Non-goals: kernels (``kernels/``), checkpoint files (integrations).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bivlm_plugin.core.binarize import BinaryCodes, dequantize, salient_mask

from .layout import BivlmLayout
from .pack import pack_bits, unpack_bits

__all__ = ["dequantize_packed", "layout_of", "pack", "storage_bits", "unpack"]


def layout_of(codes: BinaryCodes) -> BivlmLayout:
    """The layout ``pack(codes)`` produces; raises ValueError for variable-k codes and for codes
    with column scales (not in the format yet)."""
    if codes.col_scale is not None:
        raise ValueError(
            "codes with column scales (BiVLMConfig.col_scale) cannot be packed: the "
            "bivlm-binary format has no col_scale tensor yet; save them fake-quantized "
            "(`bivlm quantize --fake-quant`) or quantize with col_scale: false"
        )
    if not codes.fixed_k:
        counts = codes.salient_counts
        raise ValueError(
            "only fixed-k salient layouts can be packed: rows hold between "
            f"{int(counts.min())} and {int(counts.max())} salient weights; quantize with "
            "BiVLMConfig(salient_select='topk') so every row holds the same k"
        )
    out_f, in_f = codes.shape
    return BivlmLayout(
        out_features=out_f,
        in_features=in_f,
        n_rings=codes.n_rings,
        k=int(codes.salient_counts[0]) if out_f else 0,
        scale_mode=codes.scale_mode,
        mean_mode=codes.mean_mode,
    )


def _fp16_exact(name: str, t: torch.Tensor) -> torch.Tensor:
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        raise ValueError(
            f"BinaryCodes.{name} holds values that are not fp16-representable, so packing "
            "would change the layer; round them first with "
            "bivlm_plugin.core.binarize.round_params_fp16(codes)"
        )
    return h


def pack(codes: BinaryCodes) -> dict[str, torch.Tensor]:
    """Pack ``codes`` into the tensors of ``layout_of(codes)`` (see ``layout.py``).

    Returns:
        dict name -> tensor, on the device of ``codes``.
    """
    layout = layout_of(codes)
    sal = salient_mask(codes)
    out: dict[str, torch.Tensor] = {"signs": pack_bits(codes.signs)}
    if layout.ring_bits:
        ring = torch.where(sal, 0, codes.ring.to(torch.int64))
        if int(ring.max()) >= layout.n_rings:
            raise ValueError(f"ring index {int(ring.max())} >= n_rings={layout.n_rings}")
        planes = [pack_bits((ring >> p) & 1) for p in range(layout.ring_bits)]
        out["rings"] = torch.cat(planes, dim=1)
    out["scales"] = _fp16_exact("alpha_ring", codes.alpha_ring)
    out["mean"] = _fp16_exact("mu", codes.mu)
    if layout.k:
        out["salient_idx"] = codes.salient_idx.to(layout.idx_dtype)
        out["salient_scales"] = _fp16_exact("alpha_sal", codes.alpha_sal)
        out["salient_sign2"] = pack_bits(codes.salient_sign2, torch.uint8)
    layout.validate(out)
    return out


def unpack(packed: Mapping[str, torch.Tensor], layout: BivlmLayout) -> BinaryCodes:
    """Inverse of ``pack`` (also for sharded / fused layouts: padding entries become -1).

    Layers with k = 0 store no salient scales: they come back as zeros.
    """
    layout.validate(packed)
    o, i = layout.shape
    dev = packed["signs"].device
    signs = unpack_bits(packed["signs"], i)
    ring = torch.zeros((o, i), dtype=torch.uint8, device=dev)
    if layout.ring_bits:
        planes = packed["rings"].reshape(o, layout.ring_bits, layout.words)
        for p in range(layout.ring_bits):
            ring |= unpack_bits(planes[:, p], i).to(torch.uint8) << p
    if layout.k:
        idx = packed["salient_idx"].to(torch.int64)
        s2 = unpack_bits(packed["salient_sign2"], layout.k)
        if layout.variable_k:
            real = torch.arange(layout.k, device=dev) < packed["salient_count"].to(
                torch.int64
            ).unsqueeze(1)
            idx = torch.where(real, idx, -1)
            s2 = s2 & real
        alpha_sal = packed["salient_scales"].to(torch.float32)
    else:
        idx = torch.zeros((o, 0), dtype=torch.int64, device=dev)
        s2 = torch.zeros((o, 0), dtype=torch.bool, device=dev)
        alpha_sal = torch.zeros((o, 2), dtype=torch.float32, device=dev)
    return BinaryCodes(
        signs=signs,
        ring=ring,
        salient_idx=idx,
        salient_sign2=s2,
        alpha_ring=packed["scales"].to(torch.float32),
        alpha_sal=alpha_sal,
        mu=packed["mean"].to(torch.float32),
        shape=(o, i),
    )


def dequantize_packed(packed: Mapping[str, torch.Tensor], layout: BivlmLayout) -> torch.Tensor:
    """(O, I) float32 weight of a packed layer; equals ``core.binarize.dequantize`` exactly."""
    return dequantize(unpack(packed, layout))


def storage_bits(packed: Mapping[str, torch.Tensor], layout: BivlmLayout) -> float:
    """Stored bits per weight from the tensors themselves: total bytes * 8 / (O * I).

    Counts padding bits (the tail of each row's last word in ``signs`` and every ring plane, the
    tail of the last ``salient_sign2`` byte) and stores k as a shape, not a tensor. So against
    ``core.bits.count_bits`` (no padding, 16 bits for a fixed k when k > 0) this figure is
    exactly count_bits' + (padding bits - 16 [k > 0]) / (O * I) for fixed-k layers.

    Args:
        packed: the packed tensors.
        layout: their layout (gives I, which the packed words only bound).
    """
    layout.validate(packed)
    total = sum(t.numel() * t.element_size() for t in packed.values())
    return total * 8 / (layout.out_features * layout.in_features)
