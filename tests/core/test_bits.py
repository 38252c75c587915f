"""Bit accounting, checked by hand on 4 x 576 (DESIGN.md section 2)."""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin.core.binarize import encode
from bivlm_plugin.core.bits import count_bits, index_bits, ring_index_bits
from bivlm_plugin.core.partition import partition


def _codes(shape: tuple[int, int], p_sal: float, n_rings: int, **kw: str):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    select = kw.pop("salient_select", "topk")
    return encode(w, partition(w, p_sal, n_rings, salient_select=select), **kw)


# 4 x 576, p_sal 0.01 -> k = round(5.76) = 6 per row, 24 salient weights:
#   signs 2304, ring 2304 * ceil(log2 N), alpha_ring 16 * numel, mu 4 * 16 = 64,
#   salient_idx 24 * 16 = 384 (int16: in > 256), one k 16, sign2 24, alpha_sal 4 * 2 * 16 = 128.
@pytest.mark.parametrize(
    ("n_rings", "ring_bits", "alpha_bits"), [(1, 0, 64), (2, 2304, 128), (4, 4608, 256)]
)
def test_hand_count_4x576(n_rings: int, ring_bits: int, alpha_bits: int) -> None:
    b = count_bits(_codes((4, 576), 0.01, n_rings))
    want = {
        "signs": 2304,
        "ring": ring_bits,
        "alpha_ring": alpha_bits,
        "mu": 64,
        "salient_idx": 384,
        "salient_count": 16,
        "salient_sign2": 24,
        "alpha_sal": 128,
    }
    assert dict(b.breakdown) == want
    total = 2304 + ring_bits + alpha_bits + 64 + 384 + 16 + 24 + 128
    assert b.storage_bits == pytest.approx(total / 2304)
    assert b.weight_bits == pytest.approx((2304 + 24) / 2304)
    assert b.n_weights == 2304


def test_n1_storage_is_1_2951() -> None:
    # (2304 + 64 + 64 + 384 + 16 + 24 + 128) / 2304 = 2984 / 2304
    assert count_bits(_codes((4, 576), 0.01, 1)).storage_bits == pytest.approx(1.2951389, rel=1e-6)


def test_lean_modes_and_no_salient() -> None:
    b = count_bits(_codes((4, 576), 0.01, 4, scale_mode="ring", mean_mode="row_subset"))
    assert b.breakdown["alpha_ring"] == 4 * 16  # one fp16 per ring for the layer
    assert b.breakdown["mu"] == 4 * 5 * 16  # per row and subset (4 rings + salient)
    b0 = count_bits(_codes((4, 576), 0.0, 1))
    assert b0.storage_bits == pytest.approx((2304 + 64 + 64) / 2304)
    assert b0.weight_bits == 1.0
    assert b0.breakdown["alpha_sal"] == 0 and b0.breakdown["salient_idx"] == 0


def test_varying_counts_and_narrow_layers() -> None:
    # Threshold selection: rows differ in count -> one int16 count per row.
    c = _codes((4, 576), 0.05, 1, salient_select="threshold")
    assert not c.fixed_k
    n_sal = int(c.salient_counts.sum())
    b = count_bits(c)
    assert b.breakdown["salient_count"] == 4 * 16
    assert b.breakdown["salient_idx"] == n_sal * 16
    # in <= 256: uint8 indices; 4 x 200, p_sal 0.05 -> k = 10 per row.
    b8 = count_bits(_codes((4, 200), 0.05, 1))
    assert b8.breakdown["salient_idx"] == 40 * 8


def test_default_storage_at_smollm_widths() -> None:
    """The default ~1-bit setting: 1.2882 bits at in=576 (k=6), 1.2083 at in=1536 (k=15)."""
    # in=576: (576 + 6*16 + 16/out + 6 + 16 + 32 + 16) / 576 per row.
    b576 = count_bits(_codes((8, 576), 0.01, 1))
    assert b576.storage_bits == pytest.approx((8 * (576 + 96 + 6 + 64) + 16) / (8 * 576))
    assert b576.storage_bits < 1.3
    b1536 = count_bits(_codes((8, 1536), 0.01, 1))
    assert b1536.storage_bits == pytest.approx((8 * (1536 + 240 + 15 + 64) + 16) / (8 * 1536))


def test_helpers_and_errors() -> None:
    assert [ring_index_bits(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]
    assert index_bits(256) == 8 and index_bits(257) == 16
    with pytest.raises(ValueError, match="n_rings"):
        ring_index_bits(0)
    with pytest.raises(ValueError, match="in_features=40000"):
        index_bits(40000)
