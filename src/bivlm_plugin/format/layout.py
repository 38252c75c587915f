"""``BivlmLayout``: the one description of a packed Bi-VLM linear layer.

Every integration (compressed-tensors compressor, transformers module, vLLM method) builds its
parameters from ``BivlmLayout.specs()``: tensor names, shapes, dtypes, which dim is the output-row
dim (what fusing and row sharding act on) and which dim is bit-packed.

Stored tensors of an (O, I) layer with N rings, b = ceil(log2 N) ring bit-planes, W = ceil(I / 32)
words per row and k salient weights per row (all indexed by output row, dim 0):

============== ======== ======================= ======= ========================================
tensor         dtype    shape                   packed  content
============== ======== ======================= ======= ========================================
signs          int32    (O, W)                  dim 1   plane B / B1, bit j of word w = col 32w+j
rings          int32    (O, b*W)                dim 1   ring index bit-planes, plane-major: words
                                                        [p*W, (p+1)*W) hold bit p (absent if N=1)
scales         float16  (O, N) | (N,)           -       ring scales alpha (``scale_mode``
                                                        ``"row_ring"`` | ``"ring"``: replicated)
mean           float16  (O, 1) | (O, N+1)       -       means (``mean_mode`` ``"row"`` |
                                                        ``"row_subset"``, col N = salient mean)
salient_idx    int16    (O, k)                  -       ascending salient column of each row
               (uint8 when I <= 256)                    (absent when k = 0)
salient_scales float16  (O, 2)                  -       (a1, a2) of the salient subset
salient_sign2  uint8    (O, ceil(k/8))          dim 1   second-plane sign B2 of entry j: bit j%8
                                                        of byte j//8
salient_count  int16    (O,)                    -       only in variable-k layouts (after column
                                                        sharding or fusing unequal k): entries
                                                        j >= count are padding (idx 0, sign 0)
============== ======== ======================= ======= ========================================

Ring indices are stored as 0 at salient positions (unused there). Padding bits are zero.

Fusion (``fuse_rows``): concatenate every row-indexed tensor along dim 0. Parts must share I and
N. A part with ``scale_mode="ring"`` is expanded to (O_part, N) row scales and ``"row"`` means
to (O_part, N+1) when any part has ``"row_subset"`` (data-independent rules, so the fused shapes
are known before loading); unequal k pads to the largest k with ``salient_count``.

Tensor parallel: ``shard_rows`` slices dim 0 (replicating (N,) ring scales);
``shard_columns`` needs start / end on 32-column word boundaries (end may be I), slices the
word dims of ``signs`` and each ring plane, and keeps the salient entries inside the range with
their columns remapped to the shard (index - start), padded to min(k, shard width) with
``salient_count`` so every rank has the same static shapes. The shard's partial outputs sum to
the full output (means and scales are per row, so mu * sum(x_shard) adds up across shards).

Non-goals: the bit math (``pack.py``), conversion from ``BinaryCodes`` (``codes.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .pack import n_words, pack_bits, unpack_bits

__all__ = [
    "BivlmLayout",
    "MEAN_MODES",
    "SCALE_MODES",
    "TensorSpec",
    "fuse_rows",
    "shard_columns",
    "shard_rows",
]

SCALE_MODES = ("row_ring", "ring")
MEAN_MODES = ("row", "row_subset")
PACK_WORD = 32
MAX_IN_FEATURES = 2**15


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor of a layout.

    Attributes:
        name: key in the packed dict (and suffix of the checkpoint parameter name).
        shape: full shape.
        dtype: storage dtype.
        row_dim: dim indexed by output row (0), or None when replicated across rows.
        pack_dim: dim holding bit-packed words, or None.
        bits_per_word: elements per word along ``pack_dim`` (32 or 8), 0 when unpacked.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    row_dim: int | None
    pack_dim: int | None = None
    bits_per_word: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class BivlmLayout:
    """Shape description of one packed (out_features, in_features) layer.

    Attributes:
        out_features: O, rows.
        in_features: I, columns (<= 32768: int16 salient indices).
        n_rings: N >= 1 inlier rings.
        k: salient entries stored per row (width of ``salient_idx``).
        scale_mode: ``"row_ring"`` (O, N) or ``"ring"`` (N,) ring scales.
        mean_mode: ``"row"`` (O, 1) or ``"row_subset"`` (O, N + 1) means.
        variable_k: rows hold <= k real entries, counted by ``salient_count``.
    """

    out_features: int
    in_features: int
    n_rings: int = 1
    k: int = 0
    scale_mode: str = "row_ring"
    mean_mode: str = "row"
    variable_k: bool = False

    def __post_init__(self) -> None:
        if self.out_features < 1 or self.in_features < 1:
            raise ValueError(
                f"out_features and in_features must be >= 1, got "
                f"({self.out_features}, {self.in_features})"
            )
        if self.in_features > MAX_IN_FEATURES:
            raise ValueError(
                f"in_features={self.in_features} exceeds {MAX_IN_FEATURES} (int16 salient "
                "indices); split the layer along its input dimension"
            )
        if self.n_rings < 1:
            raise ValueError(f"n_rings must be >= 1, got {self.n_rings}")
        if not 0 <= self.k <= self.in_features:
            raise ValueError(f"k must be in [0, in_features={self.in_features}], got {self.k}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {self.scale_mode!r}")
        if self.mean_mode not in MEAN_MODES:
            raise ValueError(f"mean_mode must be one of {MEAN_MODES}, got {self.mean_mode!r}")

    @property
    def words(self) -> int:
        """W = ceil(I / 32) int32 words per row and bit-plane."""
        return n_words(self.in_features)

    @property
    def ring_bits(self) -> int:
        """b = ceil(log2 N) ring bit-planes (0 when N = 1)."""
        return math.ceil(math.log2(self.n_rings)) if self.n_rings > 1 else 0

    @property
    def idx_dtype(self) -> torch.dtype:
        return torch.uint8 if self.in_features <= 256 else torch.int16

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def specs(self) -> dict[str, TensorSpec]:
        """Every stored tensor, in storage order."""
        o, w, n = self.out_features, self.words, self.n_rings
        out = {"signs": TensorSpec("signs", (o, w), torch.int32, 0, 1, 32)}
        if self.ring_bits:
            out["rings"] = TensorSpec("rings", (o, self.ring_bits * w), torch.int32, 0, 1, 32)
        if self.scale_mode == "row_ring":
            out["scales"] = TensorSpec("scales", (o, n), torch.float16, 0)
        else:
            out["scales"] = TensorSpec("scales", (n,), torch.float16, None)
        m = 1 if self.mean_mode == "row" else n + 1
        out["mean"] = TensorSpec("mean", (o, m), torch.float16, 0)
        if self.k:
            k = self.k
            out["salient_idx"] = TensorSpec("salient_idx", (o, k), self.idx_dtype, 0)
            out["salient_scales"] = TensorSpec("salient_scales", (o, 2), torch.float16, 0)
            s2 = n_words(k, torch.uint8)
            out["salient_sign2"] = TensorSpec("salient_sign2", (o, s2), torch.uint8, 0, 1, 8)
            if self.variable_k:
                out["salient_count"] = TensorSpec("salient_count", (o,), torch.int16, 0)
        return out

    def storage_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs().values())

    def validate(self, packed: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``packed`` holds exactly this layout's tensors."""
        specs = self.specs()
        if set(packed) != set(specs):
            raise ValueError(
                f"packed tensors {sorted(packed)} do not match the layout's {sorted(specs)} "
                f"({self})"
            )
        for name, spec in specs.items():
            t = packed[name]
            if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                raise ValueError(
                    f"packed[{name!r}] is {tuple(t.shape)} {t.dtype}, the layout expects "
                    f"{spec.shape} {spec.dtype} ({self})"
                )

    @classmethod
    def from_packed(cls, packed: Mapping[str, torch.Tensor], in_features: int) -> BivlmLayout:
        """Recover the layout from tensor shapes (I is the only value shapes cannot give)."""
        out_f = int(packed["signs"].shape[0])
        scales = packed["scales"]
        n = int(scales.shape[-1])
        mean_cols = int(packed["mean"].shape[1])
        idx = packed.get("salient_idx")
        layout = cls(
            out_features=out_f,
            in_features=in_features,
            n_rings=n,
            k=0 if idx is None else int(idx.shape[1]),
            scale_mode="ring" if scales.ndim == 1 else "row_ring",
            mean_mode="row" if mean_cols == 1 else "row_subset",
            variable_k="salient_count" in packed,
        )
        layout.validate(packed)
        return layout

    @staticmethod
    def fuse(layouts: Sequence[BivlmLayout]) -> BivlmLayout:
        """Layout of ``layouts`` concatenated along rows (see module docstring for the rules)."""
        if not layouts:
            raise ValueError("fuse needs at least one layout")
        first = layouts[0]
        for lay in layouts[1:]:
            if (lay.in_features, lay.n_rings) != (first.in_features, first.n_rings):
                raise ValueError(
                    "fused layers must share in_features and n_rings, got "
                    f"{[(x.in_features, x.n_rings) for x in layouts]}; quantize the fused "
                    "siblings (q/k/v, gate/up) with the same n_rings"
                )
        if len(layouts) == 1:
            return first
        ks = [x.k for x in layouts]
        return BivlmLayout(
            out_features=sum(x.out_features for x in layouts),
            in_features=first.in_features,
            n_rings=first.n_rings,
            k=max(ks),
            scale_mode="row_ring",
            mean_mode="row_subset" if any(x.mean_mode == "row_subset" for x in layouts) else "row",
            variable_k=max(ks) > 0 and (len(set(ks)) > 1 or any(x.variable_k for x in layouts)),
        )


def _counts(packed: Mapping[str, torch.Tensor], layout: BivlmLayout) -> torch.Tensor:
    """(O,) int64 real salient entries per row."""
    if layout.variable_k:
        return packed["salient_count"].to(torch.int64)
    dev = packed["signs"].device
    return torch.full((layout.out_features,), layout.k, dtype=torch.int64, device=dev)


def _widen_salient(
    packed: Mapping[str, torch.Tensor], layout: BivlmLayout, target: BivlmLayout
) -> dict[str, torch.Tensor]:
    """Row-indexed tensors of ``packed`` re-expressed in ``target``'s per-row formats."""
    o, n = layout.out_features, layout.n_rings
    out = {k: packed[k] for k in ("signs", "rings") if k in packed}
    scales = packed["scales"]
    out["scales"] = scales.unsqueeze(0).expand(o, n).contiguous() if scales.ndim == 1 else scales
    mean = packed["mean"]
    if target.mean_mode == "row_subset" and mean.shape[1] == 1:
        mean = mean.expand(o, n + 1).contiguous()
    out["mean"] = mean
    if target.k:
        dev = scales.device
        k_new = target.k
        idx = torch.zeros((o, k_new), dtype=target.idx_dtype, device=dev)
        s2 = torch.zeros((o, k_new), dtype=torch.bool, device=dev)
        sal_scales = torch.zeros((o, 2), dtype=torch.float16, device=dev)
        if layout.k:
            idx[:, : layout.k] = packed["salient_idx"].to(target.idx_dtype)
            s2[:, : layout.k] = unpack_bits(packed["salient_sign2"], layout.k)
            sal_scales = packed["salient_scales"]
        out["salient_idx"] = idx
        out["salient_scales"] = sal_scales
        out["salient_sign2"] = pack_bits(s2, torch.uint8)
        if target.variable_k:
            out["salient_count"] = _counts(packed, layout).to(torch.int16)
    return out


def fuse_rows(
    parts: Sequence[Mapping[str, torch.Tensor]], layouts: Sequence[BivlmLayout]
) -> tuple[dict[str, torch.Tensor], BivlmLayout]:
    """Concatenate packed layers along output rows (as vLLM fuses q/k/v or gate/up).

    Args:
        parts: packed dicts, one per layer, in row order.
        layouts: their layouts.

    Returns:
        (packed, layout) of the fused layer; dequantizes to the row-concatenation of the parts.
    """
    if len(parts) != len(layouts):
        raise ValueError(f"got {len(parts)} packed parts but {len(layouts)} layouts")
    fused = BivlmLayout.fuse(layouts)
    if len(parts) == 1:
        return dict(parts[0]), fused
    widened = [_widen_salient(p, lay, fused) for p, lay in zip(parts, layouts, strict=True)]
    out = {name: torch.cat([w[name] for w in widened], dim=0) for name in fused.specs()}
    fused.validate(out)
    return out, fused


def shard_rows(
    packed: Mapping[str, torch.Tensor], layout: BivlmLayout, start: int, end: int
) -> tuple[dict[str, torch.Tensor], BivlmLayout]:
    """Rows [start, end) of a packed layer (column-parallel linear in vLLM's terms)."""
    if not 0 <= start < end <= layout.out_features:
        raise ValueError(f"row range [{start}, {end}) is outside [0, {layout.out_features})")
    out = {}
    for name, spec in layout.specs().items():
        t = packed[name]
        out[name] = t if spec.row_dim is None else t[start:end].contiguous()
    return out, replace(layout, out_features=end - start)


def shard_columns(
    packed: Mapping[str, torch.Tensor], layout: BivlmLayout, start: int, end: int
) -> tuple[dict[str, torch.Tensor], BivlmLayout]:
    """Columns [start, end) of a packed layer (row-parallel linear: partial outputs sum).

    Args:
        packed, layout: the full layer.
        start, end: column range; ``start`` a multiple of 32, ``end`` a multiple of 32 or I.

    Returns:
        (packed, layout) of the shard, with ``salient_count`` (width kept at k) when k > 0.
    """
    i = layout.in_features
    if not 0 <= start < end <= i:
        raise ValueError(f"column range [{start}, {end}) is outside [0, {i})")
    if start % PACK_WORD or (end % PACK_WORD and end != i):
        raise ValueError(
            f"column shard [{start}, {end}) must start and end on {PACK_WORD}-column word "
            f"boundaries (or end at in_features={i}); choose a tensor-parallel size that makes "
            f"in_features / tp a multiple of {PACK_WORD}"
        )
    w0, w1 = start // PACK_WORD, n_words(end)
    k_new = min(layout.k, end - start)
    new = replace(layout, in_features=end - start, k=k_new, variable_k=k_new > 0)
    out: dict[str, torch.Tensor] = {"signs": packed["signs"][:, w0:w1].contiguous()}
    if layout.ring_bits:
        planes = packed["rings"].reshape(layout.out_features, layout.ring_bits, layout.words)
        out["rings"] = planes[:, :, w0:w1].reshape(layout.out_features, -1).contiguous()
    out["scales"], out["mean"] = packed["scales"], packed["mean"]
    if k_new:
        idx = packed["salient_idx"].to(torch.int64)
        real = torch.arange(layout.k, device=idx.device) < _counts(packed, layout).unsqueeze(1)
        keep = real & (idx >= start) & (idx < end)
        # Stable sort moves kept entries to the front, keeping their ascending column order.
        order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :k_new]
        kept = keep.gather(1, order)
        new_idx = torch.where(kept, idx.gather(1, order) - start, 0)
        s2 = unpack_bits(packed["salient_sign2"], layout.k).gather(1, order) & kept
        out["salient_idx"] = new_idx.to(new.idx_dtype)
        out["salient_scales"] = packed["salient_scales"]
        out["salient_sign2"] = pack_bits(s2, torch.uint8)
        out["salient_count"] = keep.sum(dim=1).to(torch.int16)
    new.validate(out)
    return out, new
