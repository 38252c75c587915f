"""M-RoPE positions of a prompt whose image tokens were pruned, pure torch.

Qwen2-VL and Qwen2.5-VL give every prompt token a 3-D (temporal, height, width) position: text
counts up on all three rows; an image of ``t x h x w`` language-model tokens (after the spatial
merge) takes ``start + (ti, hi, wi)``; the text after it resumes at 1 + the largest position of
the whole grid. Pruning keeps a subset of each image's tokens and must keep their ORIGINAL
positions (what ``integrations/transformers/pruning.py`` does): the kept tokens take their own
grid positions and everything else is laid out as if nothing were pruned. This module computes
that layout for a prompt that already holds only the kept placeholders, from the placeholder
offsets, the grids and the kept indices; it is the position half of vLLM's pruning hook and is
tested against transformers' ``get_rope_index`` on the unpruned prompt.

Non-goals: scoring or choosing tokens (``scores.py``), padding (vLLM prompts have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["MediaSpan", "pruned_mrope_positions"]


@dataclass(frozen=True)
class MediaSpan:
    """One image (or video) in a prompt.

    Attributes:
        offset: index of its first placeholder in the (pruned) prompt.
        grid: (t, h, w) in language-model tokens, i.e. after the spatial merge.
        kept: (k,) int64 indices into the ``t * h * w`` tokens (row-major t, h, w), ascending;
            the prompt holds exactly k placeholders from ``offset``. None: all tokens kept.
        t_factor: temporal stride (Qwen2.5-VL videos: seconds per grid step * tokens per
            second); the temporal row is ``int(ti * t_factor)``. 1 for images.
    """

    offset: int
    grid: tuple[int, int, int]
    kept: torch.Tensor | None = None
    t_factor: float = 1.0

    @property
    def num_placeholders(self) -> int:
        t, h, w = self.grid
        return t * h * w if self.kept is None else int(self.kept.numel())


def _grid_positions(span: MediaSpan) -> torch.Tensor:
    """(3, t*h*w) int64 positions of the full grid, from 0."""
    t, h, w = span.grid
    grids = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack(grids).reshape(3, -1)
    if span.t_factor != 1.0:
        pos[0] = (pos[0].double() * span.t_factor).long()  # truncation, as vLLM and HF do
    return pos


def _check_kept(span: MediaSpan) -> None:
    n = span.grid[0] * span.grid[1] * span.grid[2]
    kept = span.kept
    if kept is None:
        return
    if kept.dim() != 1 or kept.numel() == 0:
        raise ValueError(f"kept indices must be a non-empty 1-D tensor, got {tuple(kept.shape)}")
    if int(kept.min()) < 0 or int(kept.max()) >= n or bool((kept[1:] <= kept[:-1]).any()):
        raise ValueError(
            f"kept indices must be ascending, distinct and in [0, {n}) for grid {span.grid}"
        )


def pruned_mrope_positions(num_tokens: int, spans: Sequence[MediaSpan]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions of a prompt with pruned images, each kept token at its original place.

    Args:
        num_tokens: prompt length T (placeholders of kept tokens only).
        spans: the prompt's images / videos, any order; they may not overlap.

    Returns:
        positions: (3, T) int64, rows (temporal, height, width).
        delta: ``positions.max() + 1 - T``; token i >= T (generated) sits at ``i + delta`` on
            all three rows, i.e. new tokens continue at 1 + the largest prompt position.

    Raises:
        ValueError: spans overlap, run past T, or carry invalid kept indices.
    """
    parts: list[torch.Tensor] = []
    cursor, next_pos = 0, 0  # prompt index of the next text token; its position
    for span in sorted(spans, key=lambda s: s.offset):
        _check_kept(span)
        text_len = span.offset - cursor
        if text_len < 0:
            raise ValueError(f"media spans overlap: one starts at {span.offset} < {cursor}")
        parts.append(torch.arange(text_len).expand(3, -1) + next_pos)
        full = _grid_positions(span) + next_pos + text_len
        next_pos = int(full.max()) + 1  # the unpruned grid's extent, whatever is kept
        parts.append(full if span.kept is None else full[:, span.kept.cpu()])
        cursor = span.offset + span.num_placeholders
    if cursor > num_tokens:
        raise ValueError(f"media placeholders run to {cursor}, past the prompt's {num_tokens}")
    parts.append(torch.arange(num_tokens - cursor).expand(3, -1) + next_pos)
    positions = torch.cat(parts, dim=1)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
