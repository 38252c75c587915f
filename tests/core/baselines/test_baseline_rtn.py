"""RTN sign binarization: exact values, honest bits, errors."""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin.core.baselines.rtn import RtnSignConfig, binarize_rtn_sign, quantize_rtn_sign
from bivlm_plugin.core.compensate import output_error
from bivlm_plugin.core.types import get_method

W_2x4 = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 1.5]])


def test_rtn_sign_exact_values_without_mean():
    res = quantize_rtn_sign(W_2x4, None, RtnSignConfig())
    # alpha = mean |w| per row: 2.5 and 0.75.
    expected = torch.tensor([[2.5, -2.5, 2.5, -2.5], [0.75, 0.75, -0.75, 0.75]])
    torch.testing.assert_close(res.w_hat, expected)
    assert res.error is None


def test_rtn_sign_exact_values_with_mean():
    w_hat, signs, alpha, mu = binarize_rtn_sign(W_2x4, per_row_mean=True)
    # Row 0: mu = -0.5, centred [1.5, -1.5, 3.5, -3.5], alpha 2.5.
    # Row 1: mu = 0.5, centred [0, 0, -1, 1]: a zero centred entry gets +1; alpha 0.5.
    torch.testing.assert_close(mu, torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(alpha, torch.tensor([2.5, 0.5]))
    torch.testing.assert_close(signs, torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, 1.0]]))
    torch.testing.assert_close(w_hat, torch.tensor([[2.0, -3.0, 2.0, -3.0], [1.0, 1.0, 0.0, 1.0]]))


def test_rtn_sign_bits_hand_checked():
    res = quantize_rtn_sign(W_2x4, None, RtnSignConfig())
    # 8 sign bits + 2 fp16 scales = 40 bits over 8 weights.
    assert dict(res.bits.breakdown) == {"sign_plane": 8, "row_scale": 32}
    assert res.bits.weight_bits == 1.0
    assert res.bits.storage_bits == 5.0
    big = quantize_rtn_sign(torch.randn(8, 256), None, RtnSignConfig(per_row_mean=True))
    assert big.bits.storage_bits == pytest.approx(1.0 + 32 / 256)  # 1.125
    assert big.bits.breakdown["row_mean"] == 8 * 16


def test_rtn_sign_error_is_hessian_weighted(weight_factory, hessian_factory):
    w, h = weight_factory(16, 64), hessian_factory(64)
    res = quantize_rtn_sign(w, h, RtnSignConfig())
    assert res.error == pytest.approx(output_error(w, res.w_hat, h), rel=1e-6)
    # Laplace(b): alpha -> E|w| = b, so the error per weight is E(|w| - b)^2 = b^2 against
    # E w^2 = 2 b^2: a relative weight error of 1/2 (measured 0.521 on this seed).
    rel = float((w - res.w_hat).pow(2).sum() / w.pow(2).sum())
    assert 0.45 < rel < 0.55


def test_rtn_sign_registered():
    fn, cfg = get_method("rtn_sign")
    assert fn is quantize_rtn_sign and cfg is RtnSignConfig


@pytest.mark.parametrize(
    "weight, hessian, match",
    [
        (torch.ones(4), None, "2-D"),
        (torch.tensor([[1.0, float("nan")]]), None, "NaN"),
        (torch.ones(2, 4, dtype=torch.int32), None, "floating"),
        (torch.ones(2, 4), torch.eye(3), "in_features=4"),
    ],
)
def test_rtn_sign_bad_inputs(weight, hessian, match):
    with pytest.raises(ValueError, match=match):
        quantize_rtn_sign(weight, hessian, RtnSignConfig())


def test_rtn_sign_bad_config():
    with pytest.raises(ValueError, match="per_row_mean"):
        RtnSignConfig(per_row_mean="yes")
    with pytest.raises(ValueError, match="RtnSignConfig"):
        quantize_rtn_sign(W_2x4, None, object())
