"""Bit allocation across layers (core/allocate.py): against brute force, and the ledger."""

from __future__ import annotations

import itertools
import random

import pytest

from bivlm_plugin.core.allocate import BitLedger, allocate


def _total(options, sizes, choice):
    bits = sum(options[i][c][0] * sizes[i] for i, c in enumerate(choice))
    return bits, sum(options[i][c][1] for i, c in enumerate(choice))


def _brute(options, sizes, budget):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in options)):
        bits, err = _total(options, sizes, choice)
        if bits <= budget and (best is None or err < best):
            best = err
    return best


def _convex_options(rng: random.Random, n: int) -> list[tuple[float, float]]:
    """Decreasing, convex error in bits (as a layer's error vs salient share usually is)."""
    bits, err, drop, out = 1.0 + rng.random() * 0.1, 1.0 + rng.random(), rng.random(), []
    for _ in range(n):
        out.append((bits, err))
        bits += 0.05 + rng.random() * 0.1
        err = max(err - drop, 0.0)
        drop *= 0.3 + 0.4 * rng.random()
    return out


@pytest.mark.parametrize("seed", range(20))
def test_allocation_fits_and_is_near_the_brute_force_optimum(seed) -> None:
    rng = random.Random(seed)
    n_layers = rng.randint(2, 5)
    options = [_convex_options(rng, rng.randint(1, 4)) for _ in range(n_layers)]
    sizes = [rng.choice([10, 30, 100]) for _ in range(n_layers)]
    lo = sum(min(b for b, _ in o) * s for o, s in zip(options, sizes, strict=True))
    hi = sum(max(b for b, _ in o) * s for o, s in zip(options, sizes, strict=True))
    budget = lo + rng.random() * (hi - lo)
    choice = allocate(options, sizes, budget)
    bits, err = _total(options, sizes, choice)
    assert bits <= budget + 1e-9
    best = _brute(options, sizes, budget)
    # Lagrangian + greedy fill: exact on the convex hull, close elsewhere (measured <= 1.10x
    # over these seeds; most are exact).
    assert err <= best * 1.10 + 1e-12, (err, best)


def test_bits_go_where_the_error_falls_most_per_bit() -> None:
    """A small hard layer takes the expensive option; the large easy one stays cheap."""
    hard = [(1.2, 10.0), (1.6, 1.0)]  # error drops 9 for 0.4 bits on 100 weights
    easy = [(1.2, 1.0), (1.6, 0.9)]  # drops 0.1 for 0.4 bits on 1000 weights
    # Budget: both at 1.2 plus 0.4 bits on 100 weights.
    choice = allocate([hard, easy], [100, 1000], 1.2 * 1100 + 40)
    assert choice == [1, 0]
    # A per-layer cap at the same average would have given the hard layer nothing.
    assert 1.2 + 40 / 1100 < 1.6


def test_over_budget_takes_the_cheapest_and_no_budget_the_best() -> None:
    opts = [[(1.0, 5.0), (2.0, 1.0)], [(1.5, 3.0), (1.1, 4.0)]]
    assert allocate(opts, [10, 10], 1.0) == [0, 1]  # nothing fits: the cheapest of each
    assert allocate(opts, [10, 10], 1e9) == [1, 0]  # everything fits: the least error


@pytest.mark.parametrize(
    "options, sizes, message",
    [
        ([[(1.0, 1.0)]], [10, 10], "1 option lists for 2 sizes"),
        ([[]], [10], "layer 0 has no option"),
        ([[(1.0, 1.0)]], [0], "size must be a positive int"),
        ([[(float("nan"), 1.0)]], [10], "positive finite bits"),
        ([[(1.0, -1.0)]], [10], "finite error >= 0"),
    ],
)
def test_bad_input_is_named(options, sizes, message) -> None:
    with pytest.raises(ValueError, match=message):
        allocate(options, sizes, 100.0)


def test_ledger_keeps_the_model_average_within_budget_and_passes_slack_on() -> None:
    ledger = BitLedger(1.3, 4000)
    assert ledger.left_per_weight == pytest.approx(1.3)
    ledger.charge(1.1, 1000)  # a fixed-rate layer spends less than its share...
    assert ledger.left_per_weight == pytest.approx((1.3 * 4000 - 1100) / 3000)
    # ...so the next group may spend more than 1.3 per weight.
    opts = [[(1.2, 2.0), (1.5, 1.0), (1.9, 0.1)]] * 2
    choice = ledger.allocate_group(opts, [1000, 1000])
    # 1.2 + 1.5 = 2.7 bits per 2 weights: over 2 * 1.3, within 2 * 1.3667.
    assert sorted(choice) == [0, 1]
    assert ledger.spent_bits == pytest.approx(1100 + 2700)
    assert ledger.allocate_group([[(1.0, 1.0), (1.3, 0.5)]], [1000]) == [1]
    assert ledger.average_bits <= 1.3 + 1e-12
    with pytest.raises(ValueError, match="budget_bits"):
        BitLedger(0.0, 10)
