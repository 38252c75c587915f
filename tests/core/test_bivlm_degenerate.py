"""Bi-VLM on degenerate calibration Hessians: rank-deficient (LayerNorm-ed inputs, fewer tokens
than features), dead inputs, all-zero rows, constant weight rows. Regression for NaN in w_hat.

Then every registered method (Bi-VLM and the baselines) on degenerate inputs: NaN / inf weights
and Hessians (refused, naming the value), constant rows, all-zero and all-constant layers,
and widths that are not a multiple of the 32-bit pack word."""

from __future__ import annotations

import math

import pytest
import torch

from bivlm_plugin.core.binarize import dequantize, encode
from bivlm_plugin.core.bivlm import BiVLMConfig, quantize_bivlm
from bivlm_plugin.core.compensate import output_error
from bivlm_plugin.core.methods import load_all
from bivlm_plugin.core.partition import partition
from bivlm_plugin.core.refine import damp_hessian, fit_means, fit_scales, layer_error, refine
from bivlm_plugin.core.types import get_method
from bivlm_plugin.format import BivlmLayout, dequantize_packed, layout_of, pack, unpack


def _layernorm_hessian(
    in_f: int, tokens: int, seed: int, dead: tuple[int, ...] = ()
) -> torch.Tensor:
    """H = 2 X^T X / n of LayerNorm-ed activations, as a tiny CLIP's q/k/v and fc1 see them.

    Every token of X sums to zero over the features (LayerNorm over the live ones, ``dead``
    inputs always zero), so H 1 = 0: the one-mean-per-row direction is in H's null space, which
    made the weighted mean fit blow up. ``tokens < in_f`` also makes H singular.
    """
    g = torch.Generator().manual_seed(seed)
    live = [j for j in range(in_f) if j not in dead]
    x = torch.zeros(tokens, in_f)
    raw = torch.randn(tokens, len(live), generator=g) * torch.exp(
        torch.randn(len(live), generator=g)
    )
    x[:, live] = torch.nn.functional.layer_norm(raw, (len(live),))
    return 2 * x.T @ x / tokens


def _clip_like_weight(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w += 0.01 * torch.randn(shape[0], 1, generator=g)  # per-row offsets
    w[torch.rand(*shape, generator=g) < 0.02] *= 8.0  # a few outliers
    return w


# The failing layers were the q/k/v and fc projections of a tiny CLIP vision encoder (width 32,
# ~68 LayerNorm-ed tokens); widths below that token count make H exactly singular.
@pytest.mark.parametrize("shape", [(32, 32), (64, 32)])
@pytest.mark.parametrize("p_sal", [0.05, 0.0])
@pytest.mark.parametrize("n_rings", [1, 2])
@pytest.mark.parametrize("scale_mode", ["row_ring", "ring"])
def test_layernorm_hessian_gives_finite_and_sane_w_hat(
    shape: tuple[int, int], p_sal: float, n_rings: int, scale_mode: str
) -> None:
    in_f = shape[1]
    h = _layernorm_hessian(in_f, tokens=24, seed=11, dead=(5,))
    assert torch.linalg.matrix_rank(h.double()) < in_f
    w = _clip_like_weight(shape, seed=111)
    base = dict(p_sal=p_sal, n_rings=n_rings, scale_mode=scale_mode, refine_iters=1)
    res = quantize_bivlm(w, h, BiVLMConfig(**base))
    assert torch.isfinite(res.w_hat).all()
    assert torch.isfinite(res.codes.alpha_ring).all() and torch.isfinite(res.codes.mu).all()
    assert math.isfinite(res.error)
    assert res.error == pytest.approx(output_error(w, res.w_hat, h), rel=1e-3, abs=1e-6)
    plain = quantize_bivlm(w, h, BiVLMConfig(**base, refine_weighted=False, compensate=False))
    # Hessian-weighted refinement + compensation must not lose to plain ARB on the output
    # error by more than 5% (measured: from 1% worse (shared ring scales) to 3x better).
    assert res.error <= 1.05 * plain.error


@pytest.mark.parametrize("refine_iters", [1, 3])
@pytest.mark.parametrize("mean_mode", ["row", "row_subset"])
def test_more_tokens_than_features_still_finite(refine_iters: int, mean_mode: str) -> None:
    """The saved failure: 68 LayerNorm-ed tokens, width 32 (H singular only along 1)."""
    h = _layernorm_hessian(32, tokens=68, seed=5, dead=(5,))
    w = _clip_like_weight((32, 32), seed=105)
    cfg = BiVLMConfig(p_sal=0.05, n_rings=2, refine_iters=refine_iters, mean_mode=mean_mode)
    res = quantize_bivlm(w, h, cfg)
    assert torch.isfinite(res.w_hat).all()
    assert res.info["relative_error"] < 0.5


@pytest.mark.parametrize("scale_mode", ["row_ring", "ring"])
def test_refine_on_singular_hessian_is_finite_and_monotone(scale_mode: str) -> None:
    """Undamped (percdamp=0) and damped refinement on an exactly singular H."""
    h = _layernorm_hessian(32, tokens=12, seed=3, dead=(2,))
    w = _clip_like_weight((16, 32), seed=4)
    c0 = encode(w, partition(w, 0.05, 2), scale_mode, "row_subset")
    for percdamp in (0.0, 0.01):
        res = refine(w, c0, h, iters=4, percdamp=percdamp)
        errs = res.errors
        assert all(math.isfinite(e) for e in errs)
        assert all(b <= a for a, b in zip(errs, errs[1:], strict=False))
        assert torch.isfinite(dequantize(res.codes)).all()
        assert res.codes.alpha_ring.abs().max() < 1.0  # no huge cancelling parameters


def test_all_zero_hessian_rows() -> None:
    """Dead inputs (zero rows and columns of H), and a completely zero H."""
    torch.manual_seed(0)
    w = torch.randn(8, 40) * 0.02
    h = _layernorm_hessian(40, tokens=200, seed=5)
    h[:, :10] = 0.0
    h[:10, :] = 0.0
    for p_sal in (0.05, 0.0):
        res = quantize_bivlm(w, h, BiVLMConfig(p_sal=p_sal, n_rings=2, refine_iters=2))
        assert torch.isfinite(res.w_hat).all()
        assert res.error == pytest.approx(output_error(w, res.w_hat, h), rel=1e-3)
        # Dead inputs are never preferred as salient (plenty of live columns per row).
        assert (
            not res.codes.salient_idx.clamp_min(0)
            .lt(10)
            .logical_and(res.codes.salient_idx >= 0)
            .any()
        )
    zero = torch.zeros(40, 40)
    res = quantize_bivlm(w, zero, BiVLMConfig(p_sal=0.05, n_rings=2))
    assert torch.isfinite(res.w_hat).all() and res.error == 0.0
    # Nothing is weighted: the fits fall back to plain ARB instead of zeroing the parameters.
    assert res.codes.alpha_ring.abs().min() > 0
    assert damp_hessian(zero, 0.01) is None
    c = encode(w, partition(w, 0.05, 2))
    for fit in (fit_means, fit_scales):
        assert torch.isfinite(dequantize(fit(w, c, zero))).all()


@pytest.mark.parametrize("scale_mode", ["row_ring", "ring"])
def test_constant_weight_row(scale_mode: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 32) * 0.02
    w[2] = 0.013
    w[4] = 0.0
    h = _layernorm_hessian(32, tokens=20, seed=6, dead=(9,))
    for hess in (h, None):
        res = quantize_bivlm(w, hess, BiVLMConfig(p_sal=0.05, n_rings=2, scale_mode=scale_mode))
        assert torch.isfinite(res.w_hat).all()
        if scale_mode == "row_ring":
            # A constant row is reproduced (to fp16 storage precision of its mean); shared ring
            # scales cannot give every row a zero spread.
            assert torch.allclose(res.w_hat[2], w[2], atol=1e-5)
            assert torch.allclose(res.w_hat[4], w[4], atol=1e-6)


def test_empty_subsets_keep_their_parameters() -> None:
    """A ring no weight of a row falls in keeps its scale instead of collapsing to 0."""
    torch.manual_seed(2)
    w = torch.randn(4, 24)
    c = encode(w, partition(w, 0.0, 2))
    ring = c.ring.clone()
    ring[1] = 0  # row 1: ring 1 empty
    c = c.__class__(**{**c.__dict__, "ring": ring})
    h = _layernorm_hessian(24, tokens=10, seed=8)
    for hess in (None, h):
        got = fit_scales(w, c, hess)
        assert got.alpha_ring[1, 1] == c.alpha_ring[1, 1]
        assert torch.isfinite(got.alpha_sal).all()
        assert layer_error(w, dequantize(got), hess) <= layer_error(w, dequantize(c), hess)


# --- every registered method: non-finite input, constant / zero layers, unpacked widths ----------

METHODS = ("bivlm", "billm", "arb_x", "arb_rc", "rtn_sign")
# Methods that take no Hessian (with these configs); arb_x needs one by design.
NO_HESSIAN = {
    "bivlm": {},
    "billm": {"salient_metric": "magnitude", "compensate": False},
    "arb_rc": {"salient_metric": "magnitude", "compensate": False},
    "rtn_sign": {},
}


def _quantizer(method: str, **overrides):
    """(quantize_fn, config) with fewer search steps / iterations than the defaults (same code
    paths, quicker on a shared CPU)."""
    load_all()
    fn, config_cls = get_method(method)
    quick = {
        "bivlm": {"p_sal": 0.05, "n_rings": 2, "refine_iters": 1},
        "billm": {"split_steps": 9},
        "arb_x": {"split_steps": 9, "iterations": 3, "x_iterations": 3},
        "arb_rc": {"split_steps": 9, "iterations": 3},
        "rtn_sign": {},
    }[method]
    return fn, config_cls(**{**quick, **overrides})


def _random_hessian(in_f: int, seed: int = 0, tokens: int = 256) -> torch.Tensor:
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / tokens


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_rejects_a_non_finite_weight(method: str, bad: float) -> None:
    fn, cfg = _quantizer(method)
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(1)) * 0.02
    w[3, 5] = bad
    with pytest.raises(ValueError) as err:
        fn(w, _random_hessian(40), cfg)
    msg = str(err.value)
    assert f"{method}: weight (8, 40) contains NaN or inf" in msg
    assert f"1 non-finite value(s) of 320, the first {bad} at [3, 5]" in msg
    assert "quantize a finite weight" in msg
    # A float64 weight beyond the float32 range (all methods compute in float32) is refused too.
    big = torch.zeros(8, 40, dtype=torch.float64)
    big[0, 1] = 1e300
    with pytest.raises(ValueError, match=r"the first inf at \[0, 1\]"):
        fn(big, _random_hessian(40), cfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_rejects_a_non_finite_hessian(method: str) -> None:
    """bivlm used to fail deep in the Cholesky / lstsq (an MKL internal assert for inf)."""
    fn, cfg = _quantizer(method)
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(1)) * 0.02
    for bad in (float("nan"), float("inf")):
        h = _random_hessian(40)
        h[2, 7] = bad
        with pytest.raises(ValueError) as err:
            fn(w, h, cfg)
        msg = str(err.value)
        assert f"{method}: hessian" in msg and "(40, 40) contains NaN or inf" in msg
        assert f"the first {bad} at [2, 7]" in msg and "calibration inputs" in msg
    if method == "bivlm":
        with pytest.raises(ValueError, match="hessian must be a torch.Tensor or None, got list"):
            fn(w, [[1.0]], cfg)


@pytest.mark.parametrize("method", ["billm", "arb_x", "arb_rc", "rtn_sign"])
def test_every_baseline_keeps_constant_rows_finite(method: str) -> None:
    """Zero-variance rows beside ordinary ones (bivlm: ``test_constant_weight_row``)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    w[1], w[2], w[4] = 0.013, -0.5, 0.0
    cases = [(_random_hessian(64), {})]
    if method in NO_HESSIAN:
        cases.append((None, NO_HESSIAN[method]))
    for h, overrides in cases:
        fn, cfg = _quantizer(method, **overrides)
        res = fn(w, h, cfg)
        assert torch.isfinite(res.w_hat).all()
        assert h is None or math.isfinite(res.error)
        if method != "arb_rc":
            # A per-row mean (or the row's own sign scale) reproduces a constant row exactly.
            for r in (1, 2, 4):
                assert torch.allclose(res.w_hat[r], w[r], rtol=1e-6, atol=1e-8), r
        # ARB-RC has no mean: its column scales are shared with the other rows, so a constant
        # row beside ordinary ones is only approximated (an all-constant layer is exact below).


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_zero_and_constant_layers(method: str) -> None:
    """An all-zero layer comes back exactly zero; a layer of constant rows comes back as its
    constants (bivlm to its fp16 storage of the means); no NaN anywhere."""
    consts = torch.tensor([0.25, -0.013, 0.0, 3.0, -1e-4, 0.5])
    layers = {"zero": torch.zeros(6, 48), "constant rows": consts[:, None].expand(6, 48).clone()}
    cases = [(_random_hessian(48), {})]
    if method in NO_HESSIAN:
        cases.append((None, NO_HESSIAN[method]))
    for label, w in layers.items():
        for h, overrides in cases:
            fn, cfg = _quantizer(method, **overrides)
            res = fn(w, h, cfg)
            assert torch.isfinite(res.w_hat).all(), label
            if label == "zero":
                assert torch.equal(res.w_hat, w), label
                assert h is None or res.error == 0.0
            else:
                rtol = 2**-11 if method == "bivlm" else 1e-6  # fp16 rounding of the means
                # ARB-RC's least-squares scales divide by (den + 1e-8), as the research code
                # does: on the -1e-4 row (squares ~ that epsilon) they are off by up to 1.4e-5.
                atol = 2e-5 if method == "arb_rc" else 1e-8
                assert torch.allclose(res.w_hat, w, rtol=rtol, atol=atol), label
                assert h is None or math.isfinite(res.error)
            if method == "bivlm":
                codes = res.codes
                for t in (codes.alpha_ring, codes.alpha_sal, codes.mu):
                    assert torch.isfinite(t).all()
                assert math.isfinite(res.info["relative_error"])
                layout = layout_of(codes)
                assert torch.equal(dequantize_packed(pack(codes), layout), res.w_hat)


@pytest.mark.parametrize("in_f", [1, 7, 33, 100])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_widths_off_the_pack_word(method: str, in_f: int) -> None:
    """in_features not a multiple of the 32-bit pack word: every method quantizes; bivlm's codes
    round trip exactly through the packed format (the last word is zero-padded)."""
    w = torch.randn(5, in_f, generator=torch.Generator().manual_seed(in_f)) * 0.02
    h = _random_hessian(in_f, seed=in_f)
    fn, cfg = _quantizer(method)
    res = fn(w, h, cfg)
    assert res.w_hat.shape == (5, in_f) and torch.isfinite(res.w_hat).all()
    assert math.isfinite(res.error) and res.error <= output_error(w, torch.zeros_like(w), h)
    if method != "bivlm":
        assert res.codes is None  # the baselines are compared against, never packed
        return
    packed, layout = pack(res.codes), layout_of(res.codes)
    assert packed["signs"].shape == (5, -(-in_f // 32)) and layout.in_features == in_f
    assert BivlmLayout.from_packed(packed, in_f) == layout
    assert torch.equal(dequantize_packed(packed, layout), res.w_hat)
    back = unpack(packed, layout)
    assert torch.equal(back.signs, res.codes.signs) and torch.equal(back.ring, res.codes.ring)


def test_bivlm_width_beyond_the_packed_format_fails_naming_it() -> None:
    """Quantizing works at any width; packing stops at 32768 inputs (int16 salient indices)
    with a message that names the width and the fix."""
    w = torch.randn(2, 32769, generator=torch.Generator().manual_seed(0))
    res = quantize_bivlm(w, None, BiVLMConfig(p_sal=0.0, refine_iters=0))
    assert torch.isfinite(res.w_hat).all()
    with pytest.raises(ValueError, match=r"in_features=32769 exceeds 32768.*split the layer"):
        layout_of(res.codes)
