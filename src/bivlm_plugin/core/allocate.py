"""Bit allocation across layers: one choice per layer, least total error under a total budget.

Each layer offers options ``(storage_bits, error)`` (for Bi-VLM: one per salient share and ring
count, each fully quantized); the layer holds ``size`` weights. ``allocate`` picks one option per
layer so that ``sum(bits * size) <= budget`` and ``sum(error)`` is small: the Lagrangian solution
(every layer takes ``argmin error + lam * bits * size`` for the least ``lam`` that fits, found by
bisection), then the slack is spent greedily on the upgrades that lower the error most per bit.
Bits go where the error falls most per bit, as in mixed-precision allocation (HAWQ, SliM-LLM):
a small layer whose error drops fast takes many salient weights, a large easy one takes none.

``BitLedger`` runs it under llm-compressor's sequential pipeline, where layers arrive in groups
(a decoder layer at a time) and later groups are unknown: each group may spend the budget left
per weight left, so the model-wide average ends at or under the budget whenever the cheapest
option of every layer fits it, and what one group leaves unspent the next ones may use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["BitLedger", "allocate"]


def _check(options: Sequence[Sequence[tuple[float, float]]], sizes: Sequence[int]) -> None:
    if len(options) != len(sizes):
        raise ValueError(f"allocate: {len(options)} option lists for {len(sizes)} sizes")
    for i, (opts, size) in enumerate(zip(options, sizes, strict=True)):
        if not opts:
            raise ValueError(f"allocate: layer {i} has no option")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"allocate: layer {i} size must be a positive int, got {size!r}")
        for bits, err in opts:
            if not (math.isfinite(bits) and bits > 0 and math.isfinite(err) and err >= 0):
                raise ValueError(
                    f"allocate: layer {i} option (bits={bits}, error={err}) must have positive "
                    "finite bits and a finite error >= 0"
                )


def _spend(options, sizes, choice) -> float:
    return sum(options[i][c][0] * sizes[i] for i, c in enumerate(choice))


def _pick(options, sizes, lam: float) -> list[int]:
    """Per layer, the option of least ``error + lam * bits * size`` (ties: fewer bits)."""
    return [
        min(range(len(opts)), key=lambda c: (opts[c][1] + lam * opts[c][0] * size, opts[c][0]))
        for opts, size in zip(options, sizes, strict=True)
    ]


def allocate(
    options: Sequence[Sequence[tuple[float, float]]], sizes: Sequence[int], budget: float
) -> list[int]:
    """Choose one option per layer: least total error with ``sum(bits * size) <= budget``.

    Args:
        options: per layer, a list of ``(storage_bits_per_weight, error)``.
        sizes: per layer, its number of weights.
        budget: total stored bits allowed for these layers.

    Returns:
        The chosen option index of each layer. When even the cheapest options exceed
        ``budget``, every layer takes its cheapest one (the caller reports the overrun).
    """
    _check(options, sizes)
    cheapest = [min(range(len(o)), key=lambda c, o=o: (o[c][0], o[c][1])) for o in options]
    if _spend(options, sizes, cheapest) > budget:
        return cheapest
    choice = _pick(options, sizes, 0.0)
    if _spend(options, sizes, choice) > budget:
        # Bisection on lam (log scale): the least price whose choice fits.
        lo, hi = 0.0, 1.0
        while _spend(options, sizes, _pick(options, sizes, hi)) > budget:
            hi *= 16.0
            if hi > 1e30:  # only the cheapest options fit
                break
        for _ in range(100):
            mid = (lo + hi) / 2
            if _spend(options, sizes, _pick(options, sizes, mid)) > budget:
                lo = mid
            else:
                hi = mid
        choice = _pick(options, sizes, hi)
        if _spend(options, sizes, choice) > budget:
            choice = cheapest
    # Spend the slack: the upgrade with the largest error drop per extra bit that still fits.
    left = budget - _spend(options, sizes, choice)
    while True:
        best, best_rate = None, 0.0
        for i, opts in enumerate(options):
            b0, e0 = opts[choice[i]]
            for c, (b, e) in enumerate(opts):
                extra = (b - b0) * sizes[i]
                if e < e0 and extra <= left:
                    rate = (e0 - e) / max(extra, 1e-12)
                    if rate > best_rate:
                        best, best_rate = (i, c, extra), rate
        if best is None:
            return choice
        i, c, extra = best
        choice[i] = c
        left -= extra


class BitLedger:
    """Model-wide bit budget spent group by group (llm-compressor's sequential subgraphs).

    Args:
        budget_bits: the average storage bits per weight allowed over every counted weight.
        total_weights: every weight the budget covers (known when the modifier initializes).
    """

    def __init__(self, budget_bits: float, total_weights: int) -> None:
        if not (math.isfinite(budget_bits) and budget_bits > 0):
            raise ValueError(f"BitLedger: budget_bits must be positive, got {budget_bits!r}")
        if total_weights <= 0:
            raise ValueError(f"BitLedger: total_weights must be positive, got {total_weights!r}")
        self.budget_bits = float(budget_bits)
        self.total_weights = int(total_weights)
        self.spent_bits = 0.0
        self.counted_weights = 0

    @property
    def left_per_weight(self) -> float:
        """Budget left per weight not yet counted."""
        remaining = self.total_weights - self.counted_weights
        if remaining <= 0:
            return 0.0
        return (self.budget_bits * self.total_weights - self.spent_bits) / remaining

    def charge(self, storage_bits: float, n_weights: int) -> None:
        """Count a layer quantized at a fixed rate (outside the allocation)."""
        self.spent_bits += storage_bits * n_weights
        self.counted_weights += n_weights

    def allocate_group(
        self, options: Sequence[Sequence[tuple[float, float]]], sizes: Sequence[int]
    ) -> list[int]:
        """Choose for a group of layers with the budget left per weight; charges the choice."""
        choice = allocate(options, sizes, self.left_per_weight * sum(sizes))
        for i, c in enumerate(choice):
            self.charge(options[i][c][0], sizes[i])
        return choice

    @property
    def average_bits(self) -> float:
        return self.spent_bits / self.counted_weights if self.counted_weights else 0.0
