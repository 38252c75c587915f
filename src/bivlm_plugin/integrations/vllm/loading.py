"""What one tensor-parallel rank holds of a (possibly fused) packed linear, and how to build it.

vLLM loads a checkpoint one tensor at a time: ``q_proj.signs``, then ``q_proj.scales``, ...
into parameters of the fused, rank-local layer (``qkv_proj`` on rank t). Bi-VLM tensors of one
part cannot be placed independently (a column shard keeps the salient entries inside the range,
so ``salient_sign2`` depends on ``salient_idx``; a part with ``"ring"`` scales is widened to
per-row scales in a fused layer), so the vLLM method collects each part's stored tensors and
hands them here once complete:

1. ``slice_part``: take the rank's rows (column-parallel: ``shard_rows``) or columns
   (row-parallel: ``shard_columns``, 32-column word boundaries, salient indices remapped);
2. ``assemble``: fuse the sliced parts along rows (``fuse_rows``: widening of scales / means,
   unequal k padded with ``salient_count``).

``RankPlan`` computes the resulting shapes from the stored layouts alone, before any tensor is
read, so the method can allocate parameters of the right shapes in ``create_weights``.

Pure torch + ``bivlm_plugin.format``: importable and testable without vLLM.

Non-goals: reading checkpoints (``format/checkpoint.py``), vLLM objects (``linear_method.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from bivlm_plugin.format.layout import PACK_WORD, BivlmLayout, fuse_rows, shard_columns, shard_rows

__all__ = [
    "PartSlice",
    "RankPlan",
    "assemble",
    "column_parallel_plan",
    "row_parallel_plan",
    "slice_part",
    "sliced_layout",
]

Range = tuple[int, int]


def _is_full(rng: Range | None, size: int) -> bool:
    return rng is None or (rng[0] == 0 and rng[1] == size)


def sliced_layout(layout: BivlmLayout, rows: Range | None = None, cols: Range | None = None):
    """Layout of ``slice_part(packed, layout, rows, cols)`` without touching data."""
    if not _is_full(rows, layout.out_features):
        layout = replace(layout, out_features=rows[1] - rows[0])
    if not _is_full(cols, layout.in_features):
        width = cols[1] - cols[0]
        k = min(layout.k, width)
        layout = replace(layout, in_features=width, k=k, variable_k=k > 0)
    return layout


def slice_part(
    packed: Mapping[str, torch.Tensor],
    layout: BivlmLayout,
    rows: Range | None = None,
    cols: Range | None = None,
) -> tuple[dict[str, torch.Tensor], BivlmLayout]:
    """Rows and / or columns of one stored packed layer (full ranges are no-ops).

    Args:
        packed: the stored tensors of the layer, ``layout``'s shapes.
        rows: [start, end) output rows (column-parallel rank), or None for all.
        cols: [start, end) input columns (row-parallel rank; word-aligned), or None for all.
    """
    packed = dict(packed)
    if not _is_full(rows, layout.out_features):
        packed, layout = shard_rows(packed, layout, *rows)
    if not _is_full(cols, layout.in_features):
        packed, layout = shard_columns(packed, layout, *cols)
    return packed, layout


@dataclass(frozen=True)
class PartSlice:
    """One stored part of a rank-local layer.

    Attributes:
        layout: the part's stored (full) layout.
        rows: output rows of the part this rank takes (None: all).
        cols: input columns this rank takes (None: all).
    """

    layout: BivlmLayout
    rows: Range | None = None
    cols: Range | None = None

    @property
    def rank_layout(self) -> BivlmLayout:
        return sliced_layout(self.layout, self.rows, self.cols)


@dataclass(frozen=True)
class RankPlan:
    """The parts of one rank-local layer, in row order (q, k, v or gate, up, or a single one)."""

    parts: tuple[PartSlice, ...]

    @property
    def layout(self) -> BivlmLayout:
        """Layout of the rank-local (fused) parameters."""
        return BivlmLayout.fuse([p.rank_layout for p in self.parts])


def column_parallel_plan(
    layouts: Sequence[BivlmLayout], partition_sizes: Sequence[int], shard_ranks: Sequence[int]
) -> RankPlan:
    """Plan of a column-parallel (output-row split) layer, fused or not.

    Args:
        layouts: stored layout of each part (q, k, v / gate, up / one).
        partition_sizes: rows of each part on this rank (vLLM's ``output_partition_sizes``).
        shard_ranks: which slice of each part this rank holds (the tp rank; for k / v with
            replicated KV heads, ``tp_rank // num_kv_head_replicas``).
    """
    if not len(layouts) == len(partition_sizes) == len(shard_ranks):
        raise ValueError(
            f"got {len(layouts)} stored parts for {len(partition_sizes)} output partitions "
            f"({list(partition_sizes)}); the checkpoint's fused siblings do not match the model"
        )
    parts = []
    for lay, size, rank in zip(layouts, partition_sizes, shard_ranks, strict=True):
        start = rank * size
        if start + size > lay.out_features:
            raise ValueError(
                f"rank slice [{start}, {start + size}) exceeds the stored {lay.out_features} "
                "rows; the checkpoint was written for another model shape"
            )
        parts.append(PartSlice(lay, rows=(start, start + size)))
    return RankPlan(tuple(parts))


def tensor_parallel_sizes_for(in_features: int, up_to: int = 16) -> list[int]:
    """Tensor-parallel sizes whose row-parallel shards of ``in_features`` columns fall on
    32-column pack words (1 always works)."""
    return [
        t
        for t in range(1, up_to + 1)
        if t == 1 or (in_features % t == 0 and (in_features // t) % PACK_WORD == 0)
    ]


def row_parallel_plan(layout: BivlmLayout, start: int, end: int) -> RankPlan:
    """Plan of a row-parallel (input-column split) layer: columns [start, end)."""
    if start % PACK_WORD or (end % PACK_WORD and end != layout.in_features):
        i = layout.in_features
        raise ValueError(
            f"row-parallel shard [{start}, {end}) of in_features={i} is not on "
            f"{PACK_WORD}-column pack-word boundaries (each rank's {end - start} columns must be "
            f"a multiple of {PACK_WORD}); tensor_parallel_size values that work for this layer: "
            f"{tensor_parallel_sizes_for(i)}"
        )
    return RankPlan((PartSlice(layout, cols=(start, end)),))


def assemble(
    plan: RankPlan, stored: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The rank-local packed tensors of ``plan`` from each part's full stored tensors."""
    if len(stored) != len(plan.parts):
        raise ValueError(f"got {len(stored)} stored parts, the plan has {len(plan.parts)}")
    sliced = [
        slice_part(s, p.layout, p.rows, p.cols) for s, p in zip(stored, plan.parts, strict=True)
    ]
    packed, layout = fuse_rows([s[0] for s in sliced], [s[1] for s in sliced])
    if layout != plan.layout:
        raise AssertionError(f"assembled layout {layout} differs from the plan's {plan.layout}")
    return packed
