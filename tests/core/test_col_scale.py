"""Column scales (``BiVLMConfig.col_scale``): one fp16 per input column, W_hat = Q diag(c)."""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.core.bits import count_bits
from bivlm_plugin.core.bivlm import BiVLMConfig, bivlm_options, quantize_bivlm
from bivlm_plugin.core.colscale import (
    fold_norm_weight,
    initial_col_scale,
    solve_col_scale,
    tie_scale,
)
from bivlm_plugin.core.refine import layer_error


def _layer(out: int = 48, n_in: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplace weights whose input columns have log-normal scales (as real layers do after an
    RMSNorm with uneven gains), and H from inputs with correlated, uneven channels."""
    gen = torch.Generator().manual_seed(seed)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((out, n_in))
    cols = torch.exp(0.6 * torch.randn(n_in, generator=gen))
    rows = torch.exp(0.3 * torch.randn(out, 1, generator=gen))
    w = 0.02 * lap * cols * rows
    mix = torch.eye(n_in) + 0.2 * torch.randn(n_in, n_in, generator=gen)
    x = torch.randn(512, n_in, generator=gen) * torch.exp(0.5 * torch.randn(n_in, generator=gen))
    x = x @ mix
    return w, 2 * x.T @ x / x.shape[0]


def test_col_scale_lowers_error_and_is_counted() -> None:
    """Measured on this layer (seeds 0 / 3 / 4): relative error 0.153 / 0.182 / 0.154 with column
    scales vs 0.236 / 0.246 / 0.238 without (0.65-0.74x)."""
    torch.manual_seed(0)
    w, h = _layer()
    base = quantize_bivlm(w, h, BiVLMConfig(code_choice="column"))
    cols = quantize_bivlm(w, h, BiVLMConfig(code_choice="column", col_scale=True))
    # The layer holds real column structure: column scales must buy a clear drop.
    assert cols.info["relative_error"] < 0.9 * base.info["relative_error"], (
        cols.info["relative_error"],
        base.info["relative_error"],
    )
    # Counted: exactly one fp16 per input column on top of the same codes.
    assert cols.bits.breakdown["col_scale"] == 16 * w.shape[1]
    extra = cols.bits.storage_bits - base.bits.storage_bits
    assert extra == pytest.approx(16 / w.shape[0])
    assert "col_scale" not in base.bits.breakdown
    assert count_bits(cols.codes).storage_bits == cols.bits.storage_bits
    # The result is what the codes dequantize to, the scales are fp16 values, and the reported
    # error is the layer's own tr(R H R^T) (the change of variables is exact).
    c = cols.codes.col_scale
    assert c.shape == (w.shape[1],) and torch.equal(c.half().float(), c)
    torch.testing.assert_close(dequantize(cols.codes), cols.w_hat)
    assert cols.error == pytest.approx(layer_error(w, cols.w_hat, h), rel=1e-5)


def test_col_scale_without_hessian_and_with_candidates() -> None:
    w, h = _layer(seed=1)
    plain = quantize_bivlm(w, None, BiVLMConfig(compensate=False))
    cols = quantize_bivlm(w, None, BiVLMConfig(compensate=False, col_scale=True))
    assert cols.info["frobenius_error"] < plain.info["frobenius_error"]
    opts = bivlm_options(
        w, h, BiVLMConfig(col_scale=True, p_sal_candidates=(0.0, 0.02)), n_rings_options=(1, 2)
    )
    assert [(r.info["n_rings"], r.info["p_sal"]) for r in opts] == [
        (1, 0.0),
        (1, 0.02),
        (2, 0.0),
        (2, 0.02),
    ]
    assert all(r.codes.col_scale is not None for r in opts)
    # Under a cap the column scales' bits count: a budget that fits the codes alone does not fit.
    cap = quantize_bivlm(w, h, BiVLMConfig(p_sal=0.0)).bits.storage_bits
    with pytest.raises(ValueError, match="smallest achievable"):
        quantize_bivlm(w, h, BiVLMConfig(p_sal_candidates=(0.0,), bit_budget=cap, col_scale=True))


def test_solve_col_scale_recovers_exact_scales() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(32, 16, generator=gen)
    c = torch.exp(0.5 * torch.randn(16, generator=gen))
    x = torch.randn(256, 16, generator=gen)
    h = 2 * x.T @ x / 256
    got = solve_col_scale([q * c], [q], [h], torch.ones(16), 0.0)
    torch.testing.assert_close(got, c, rtol=1e-3, atol=1e-3)
    got_unweighted = solve_col_scale([q * c], [q], [None], torch.ones(16), 0.0)
    torch.testing.assert_close(got_unweighted, c, rtol=1e-3, atol=1e-3)


def test_shared_solve_is_the_least_squares_of_the_summed_errors() -> None:
    # Two layers reading one input: the shared c minimizes the sum of their errors, so the
    # gradient of sum_l tr((W_l - Q_l D) H (W_l - Q_l D)^T) vanishes there.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 12, generator=gen)
    h = 2 * x.T @ x / 512
    ws = [torch.randn(8, 12, generator=gen), torch.randn(5, 12, generator=gen)]
    qs = [torch.sign(w) for w in ws]
    c = solve_col_scale(ws, qs, [h, h], torch.ones(12), 0.0).requires_grad_(True)
    loss = sum(torch.trace((w - q * c) @ h @ (w - q * c).T) for w, q in zip(ws, qs, strict=True))
    (grad,) = torch.autograd.grad(loss, c)
    assert grad.abs().max() < 1e-3 * loss.item()
    with pytest.raises(ValueError, match="one code and one Hessian per target"):
        solve_col_scale(ws, qs[:1], [h, h], torch.ones(12), 0.0)


def test_tied_solve_recovers_tied_scales() -> None:
    # 12 columns taking 4 free scales in groups of 3 (o_proj under grouped-query attention).
    gen = torch.Generator().manual_seed(4)
    tie = torch.arange(12) // 3
    free = torch.exp(0.5 * torch.randn(4, generator=gen))
    q = torch.randn(16, 12, generator=gen)
    x = torch.randn(256, 12, generator=gen)
    h = 2 * x.T @ x / 256
    c0 = torch.ones(12)
    got = solve_col_scale([q * free[tie]], [q], [h], c0, 0.0, tie)
    torch.testing.assert_close(got, free[tie], rtol=1e-3, atol=1e-3)
    c = torch.tensor([1.0, 4.0, 2.0, 8.0])
    torch.testing.assert_close(tie_scale(c, torch.tensor([0, 0, 1, 1])), torch.tensor([2.0, 4.0]))


def test_initial_col_scale_by_hand() -> None:
    # |w - mu_row| / sd_row (torch.std: unbiased), averaged down each column, geo-mean 1.
    w = torch.tensor([[0.0, 2.0, 4.0], [1.0, 5.0, 3.0]])
    z = (w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True)
    raw = z.abs().mean(0)
    torch.testing.assert_close(initial_col_scale(w), raw / raw.log().mean().exp())
    assert abs(float(initial_col_scale(w).log().mean())) < 1e-6
    dead = torch.cat([w, torch.zeros(2, 1)], dim=1)  # an all-zero column: floored, not 0
    assert float(initial_col_scale(dead)[-1]) > 0


def test_fold_norm_weight_scales_the_output() -> None:
    w = torch.tensor([0.5, -0.25, 2.0])
    s = torch.tensor([2.0, 0.5, 1.5])
    torch.testing.assert_close(fold_norm_weight(w, s, 0.0), w * s)
    # Gemma: n(x) * (1 + w) -> (1 + w') = (1 + w) * s
    torch.testing.assert_close(1 + fold_norm_weight(w, s, 1.0), (1 + w) * s)


def test_col_scale_codes_are_refused_by_the_packer() -> None:
    from bivlm_plugin.format.codes import pack

    w, h = _layer(out=8, n_in=64)
    result = quantize_bivlm(w, h, BiVLMConfig(col_scale=True))
    with pytest.raises(ValueError, match="col_scale.*--fake-quant"):
        pack(result.codes)
    with pytest.raises(ValueError, match="col_scale"):
        BiVLMConfig(col_scale="yes")


def test_quantize_refuses_col_scale_for_a_packed_save(tmp_path) -> None:
    """Before any calibration: the packed format cannot hold the scales, so a packed save would
    silently store those layers dense."""
    from bivlm_plugin.app.quantize import quantize_model

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="col_scale: true.*--fake-quant"):
        quantize_model(tmp_path, "bivlm_lm_w1", tmp_path / "out", overrides={"col_scale": True})
    assert not (tmp_path / "out").exists()
