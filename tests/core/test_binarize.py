"""Hybrid binarization: hand-computed codes, exact dequantization, grid re-quantization."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bivlm_plugin.core.binarize import (
    BinaryCodes,
    dense_sign2,
    dequantize,
    encode,
    grid_from_codes,
    quantize_with_grid,
    round_params_fp16,
    salient_mask,
    scale_rows,
)
from bivlm_plugin.core.partition import partition

# Row 0: mean 1, deviations (0, -2, 2, -10, 8, 2): salient cols 3, 4 (k = 2 per row).
#   inliers: signs (+, -, +, +), alpha = (0 + 2 + 2 + 2) / 4 = 1.5 -> (2.5, -0.5, 2.5, 2.5)
#   salient: B1 = (-, +), a1 = (10 + 8) / 2 = 9, residual (-1, -1): B2 = (-, -), a2 = 1
# Row 1: mean -1, deviations (1, 1, 1, 1, 7, -11): salient cols 4, 5.
#   inliers: alpha 1 -> 0; salient: a1 = 9, residual (-2, -2): B2 = (-, -), a2 = 2
W_HAND = torch.tensor([[1.0, -1.0, 3.0, -9.0, 9.0, 3.0], [0.0, 0.0, 0.0, 0.0, 6.0, -12.0]])


def _hand_codes(**kw: str) -> BinaryCodes:
    return encode(W_HAND, partition(W_HAND, 2 / 6, 1), **kw)


def test_encode_hand_case() -> None:
    c = _hand_codes()
    assert c.salient_idx.tolist() == [[3, 4], [4, 5]]
    assert c.salient_sign2.tolist() == [[False, False], [False, False]]
    assert c.signs.tolist() == [
        [True, False, True, False, True, True],
        [True, True, True, True, True, False],
    ]
    assert c.alpha_ring.squeeze(1).tolist() == pytest.approx([1.5, 1.0])
    assert c.alpha_sal.flatten().tolist() == pytest.approx([9.0, 1.0, 9.0, 2.0])
    assert c.mu.squeeze(1).tolist() == pytest.approx([1.0, -1.0])
    w_hat = dequantize(c)
    want = [[2.5, -0.5, 2.5, -9.0, 9.0, 2.5], [0.0, 0.0, 0.0, 0.0, 6.0, -12.0]]
    assert w_hat.flatten().tolist() == pytest.approx(sum(want, []))
    assert c.fixed_k and c.salient_counts.tolist() == [2, 2]


def test_encode_hand_modes() -> None:
    # One alpha per ring for the layer: mean |dev| over all 8 inliers = (6 + 4) / 8 = 1.25.
    c = _hand_codes(scale_mode="ring")
    assert c.alpha_ring.shape == (1,) and c.alpha_ring.item() == pytest.approx(1.25)
    assert c.scale_mode == "ring"
    # Means per subset: row 0 inliers (1, -1, 3, 3) -> 1.5, salient (-9, 9) -> 0.
    c = _hand_codes(mean_mode="row_subset")
    assert c.mu.flatten().tolist() == pytest.approx([1.5, 0.0, 0.0, -3.0])
    assert c.mean_mode == "row_subset"
    with pytest.raises(ValueError, match="scale_mode"):
        _hand_codes(scale_mode="col")
    with pytest.raises(ValueError, match="mean_mode"):
        _hand_codes(mean_mode="layer")


def _manual_dequantize(c: BinaryCodes) -> torch.Tensor:
    """Element by element from the stored tensors, independent of the vectorized code."""
    out_f, in_f = c.shape
    w = torch.zeros(out_f, in_f)
    n = c.n_rings
    for r in range(out_f):
        for j in range(in_f):
            k = int(c.ring[r, j])
            a = c.alpha_ring[k] if c.alpha_ring.ndim == 1 else c.alpha_ring[r, k]
            m = c.mu[r, 0] if c.mu.shape[1] == 1 else c.mu[r, k]
            w[r, j] = m + a * (1.0 if c.signs[r, j] else -1.0)
        for slot, j in enumerate(c.salient_idx[r].tolist()):
            if j < 0:
                continue
            m = c.mu[r, 0] if c.mu.shape[1] == 1 else c.mu[r, n]
            b1 = 1.0 if c.signs[r, j] else -1.0
            b2 = 1.0 if c.salient_sign2[r, slot] else -1.0
            w[r, j] = m + c.alpha_sal[r, 0] * b1 + c.alpha_sal[r, 1] * b2
    return w


@pytest.mark.parametrize(("scale_mode", "mean_mode"), [("row_ring", "row"), ("ring", "row_subset")])
def test_dequantize_matches_manual(scale_mode: str, mean_mode: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 13)
    part = partition(w, 0.15, 3, salient_select="threshold")
    c = encode(w, part, scale_mode, mean_mode)
    assert torch.allclose(dequantize(c), _manual_dequantize(c), atol=1e-6)


def test_padding_for_varying_counts() -> None:
    torch.manual_seed(1)
    w = torch.randn(37, 545)
    part = partition(w, 0.02, 3, salient_select="threshold")
    c = encode(w, part)
    counts = part.salient_counts
    assert not c.fixed_k and c.salient_idx.shape[1] == int(counts.max())
    assert c.salient_counts.tolist() == counts.tolist()
    assert (c.salient_idx[c.salient_idx < 0] == -1).all()
    assert torch.equal(salient_mask(c), part.salient)
    assert not (dense_sign2(c) & ~part.salient).any()


@pytest.mark.parametrize("n_rings", [1, 2, 4])
def test_grid_requantization_round_trip(n_rings: int) -> None:
    """W_hat re-quantized on its own grid gives the same codes and W_hat bit for bit."""
    torch.manual_seed(2)
    w = torch.randn(24, 545)
    part = partition(w, 0.02, n_rings, salient_select="threshold")
    c = encode(w, part)
    w_hat = dequantize(c)
    grid = grid_from_codes(c)
    cc = quantize_with_grid(w_hat, grid, slice(None))
    assert torch.equal(cc.w_hat, w_hat)
    assert torch.equal(cc.signs, c.signs) and torch.equal(cc.ring, c.ring)
    assert torch.equal(cc.sign2, dense_sign2(c))
    # Column blocks (last one narrower: 545 = 4 * 128 + 33) give the same codes as one pass.
    blocks = [
        quantize_with_grid(w[:, c0 : c0 + 128], grid, slice(c0, c0 + 128))
        for c0 in range(0, 545, 128)
    ]
    whole = quantize_with_grid(w, grid, torch.arange(545))
    assert torch.equal(torch.cat([b.w_hat for b in blocks], dim=1), whole.w_hat)


def test_nearest_assignment_never_worse_than_threshold() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 300)
    part = partition(w, 0.01, 4)
    c = encode(w, part)
    near = quantize_with_grid(w, grid_from_codes(c, part, "nearest"), slice(None))
    thr = quantize_with_grid(w, grid_from_codes(c, part, "threshold"), slice(None))
    # The threshold rule reproduces encode's own codes exactly.
    assert torch.equal(thr.w_hat, dequantize(c))
    assert ((w - near.w_hat).abs() <= (w - thr.w_hat).abs() + 1e-7).all()
    assert (w - near.w_hat).square().sum() < 0.99 * (w - thr.w_hat).square().sum()


def test_round_params_fp16() -> None:
    c = round_params_fp16(_hand_codes())
    c2 = dataclasses.replace(c, alpha_ring=torch.tensor([[1.0001], [1.0]]))
    assert round_params_fp16(c2).alpha_ring[0, 0].item() == 1.0
    assert c.mu.dtype == torch.float32


@pytest.mark.parametrize("mean_mode", ["row", "row_subset"])
def test_scale_rows_scales_every_level_of_a_row(mean_mode: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 13)
    codes = encode(w, partition(w, 0.15, 2), "row_ring", mean_mode)
    r = torch.tensor([2.0, 0.5, 1.0, 3.0, 0.25])
    scaled = scale_rows(codes, r)
    assert torch.allclose(dequantize(scaled), r[:, None] * dequantize(codes), atol=1e-6)
    assert torch.equal(scaled.signs, codes.signs) and torch.equal(scaled.ring, codes.ring)
    with pytest.raises(ValueError, match=r"\(out,\) = \(5,\)"):
        scale_rows(codes, r[:4])
    ring = encode(w, partition(w, 0.15, 2), "ring", mean_mode)
    with pytest.raises(ValueError, match="scale_mode: row_ring"):
        scale_rows(ring, r)


def test_bad_codes_and_grid_inputs() -> None:
    c = _hand_codes()
    with pytest.raises(ValueError, match="alpha_sal"):
        dataclasses.replace(c, alpha_sal=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mu"):
        dataclasses.replace(c, mu=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="w_cols shape"):
        quantize_with_grid(torch.zeros(2, 3), grid_from_codes(c), slice(0, 4))
    with pytest.raises(ValueError, match="Partition"):
        grid_from_codes(c, None, "threshold")
