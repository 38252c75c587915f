"""Bi-VLM layer quantizer: config validation, quality floors, compensation, budget choice."""

from __future__ import annotations

import math

import pytest
import torch

from bivlm_plugin.core.binarize import BinaryCodes, dequantize
from bivlm_plugin.core.bits import count_bits
from bivlm_plugin.core.bivlm import BiVLMConfig, quantize_bivlm
from bivlm_plugin.core.compensate import output_error
from bivlm_plugin.core.types import get_method


def _correlated_hessian(in_f: int, seed: int, tokens: int = 512) -> torch.Tensor:
    """H = 2 X^T X / n of inputs with mixed channels and uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.6 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * torch.exp(
        0.7 * torch.randn(in_f, generator=g)
    )
    return 2 * x.T @ x / tokens


def _sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return 10 * math.log10(float(w.square().sum() / (w - w_hat).square().sum()))


def test_registered() -> None:
    fn, cfg_cls = get_method("bivlm")
    assert fn is quantize_bivlm and cfg_cls is BiVLMConfig


# Measured once (64 x 320, randn * 0.02, seed 0, no Hessian, default refinement):
#   N=1: 4.4457 dB (p_sal 0), 5.3509 dB (p_sal 0.02); N=2: 9.2970, 10.5896; N=4: 13.8595, 15.7239
@pytest.mark.parametrize(
    ("n_rings", "p_sal", "floor"),
    [
        (1, 0.0, 4.40),
        (1, 0.02, 5.30),
        (2, 0.0, 9.25),
        (2, 0.02, 10.50),
        (4, 0.0, 13.80),
        (4, 0.02, 15.65),
    ],
)
def test_sqnr_floors(n_rings: int, p_sal: float, floor: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 320) * 0.02
    res = quantize_bivlm(w, None, BiVLMConfig(n_rings=n_rings, p_sal=p_sal))
    assert res.error is None
    assert _sqnr_db(w, res.w_hat) > floor


def test_compensation_reduces_output_error() -> None:
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 1.0).sample((48, 160))
    h = _correlated_hessian(160, 2)
    plain = quantize_bivlm(w, h, BiVLMConfig(compensate=False, block_size=64))
    comp = quantize_bivlm(w, h, BiVLMConfig(compensate=True, block_size=64))
    # measured: relative output error 0.2513 without, 0.2242 with compensation (ratio 0.892)
    assert comp.error < 0.93 * plain.error
    assert comp.info["relative_error"] < 0.235


@pytest.mark.parametrize(("shape", "n_rings"), [((24, 545), 2), ((16, 830), 1)])
def test_awkward_widths_are_consistent(shape: tuple[int, int], n_rings: int) -> None:
    torch.manual_seed(3)
    w = torch.randn(*shape)
    h = _correlated_hessian(shape[1], 4)
    res = quantize_bivlm(w, h, BiVLMConfig(n_rings=n_rings, refine_iters=1))
    codes = res.codes
    assert isinstance(codes, BinaryCodes) and codes.shape == shape
    assert torch.equal(res.w_hat, dequantize(codes))
    assert res.bits == count_bits(codes)
    assert res.error == pytest.approx(output_error(w, res.w_hat, h), rel=1e-4)
    # fp16 storage: parameters are exactly representable in half precision.
    assert torch.equal(codes.alpha_sal, codes.alpha_sal.half().float())
    assert res.info["relative_error"] < (0.35 if n_rings == 1 else 0.15)
    assert res.info["n_rings"] == n_rings and res.info["p_sal"] == 0.01


def test_budget_selection() -> None:
    torch.manual_seed(5)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 576))
    h = _correlated_hessian(576, 6, tokens=1024)
    # storage at in=576: p_sal 0 -> 1.0556, 0.01 -> 1.2899 (k=6), 0.05 -> 1.9679 (k=29)
    cfg = BiVLMConfig(p_sal_candidates=(0.0, 0.01, 0.05), bit_budget=1.3, refine_iters=1)
    res = quantize_bivlm(w, h, cfg)
    cands = res.info["candidates"]
    assert set(cands) == {0.0, 0.01}
    assert set(res.info["over_budget"]) == {0.05}
    assert res.info["over_budget"][0.05] == pytest.approx(1.9679, abs=1e-3)
    assert res.bits.storage_bits <= 1.3
    assert res.error == min(c["error"] for c in cands.values())
    assert res.info["p_sal"] == 0.01  # salient weights pay off on heavy-tailed rows
    with pytest.raises(ValueError, match=r"smallest achievable is 1\.0556"):
        quantize_bivlm(w, h, BiVLMConfig(p_sal_candidates=(0.0, 0.01), bit_budget=1.0))


@pytest.mark.parametrize("search", ["encoded", "refined"])
def test_cheap_search_finishes_only_the_winner(monkeypatch, search: str) -> None:
    """The cheap searches compare the fitting shares on the error of their closed-form
    (or once-refined) codes, then compensate once: the result is exactly the full pipeline at the
    winning share, and the shares' proxy errors are what the report shows."""
    import bivlm_plugin.core.bivlm as bivlm_mod
    from bivlm_plugin.core.binarize import encode
    from bivlm_plugin.core.partition import partition, saliency_score
    from bivlm_plugin.core.refine import layer_error

    torch.manual_seed(7)
    w = torch.distributions.Laplace(0.0, 1.0).sample((24, 576))
    h = _correlated_hessian(576, 8, tokens=1024)
    cands = (0.0, 0.005, 0.01, 0.05)  # 0.05 is over the 1.3-bit budget
    base = dict(p_sal_candidates=cands, bit_budget=1.3, refine_iters=2, n_rings=1)
    calls = {"compensate": 0, "refine": 0}
    real_comp, real_refine = bivlm_mod._compensate, bivlm_mod.refine

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(bivlm_mod, "_compensate", counting("compensate", real_comp))
    monkeypatch.setattr(bivlm_mod, "refine", counting("refine", real_refine))
    cheap = quantize_bivlm(w, h, BiVLMConfig(**base, candidate_search=search))
    fits = 3
    # refined: one iteration per fitting share, then the winner's remaining one
    assert calls == {"compensate": 1, "refine": 1 if search == "encoded" else fits + 1}
    calls.update(compensate=0, refine=0)
    full = quantize_bivlm(w, h, BiVLMConfig(**base))
    assert calls == {"compensate": fits, "refine": fits}

    info = cheap.info
    assert info["candidate_search"] == search and full.info["candidate_search"] == "full"
    assert set(info["candidates"]) == {0.0, 0.005, 0.01} and set(info["over_budget"]) == {0.05}
    proxies = {p: c["proxy_error"] for p, c in info["candidates"].items()}
    assert info["p_sal"] == min(proxies, key=proxies.get)
    assert info["candidates"][info["p_sal"]]["error"] == cheap.error
    if search == "encoded":  # the proxy is the error of the closed-form codes, by hand
        mu = w.mean(dim=1, keepdim=True)
        d = torch.diagonal(bivlm_mod.inverse_cholesky(h, 0.01)[0])
        for p, got in proxies.items():
            part = partition(w, p, 1, "row", "topk", saliency_score(w, mu, d))
            want = layer_error(w, dequantize(encode(w, part, "row_ring", "row")), h)
            assert got == pytest.approx(want, rel=1e-6)
    # The winner is the full pipeline at that share, bit for bit.
    fixed = quantize_bivlm(
        w, h, BiVLMConfig(**{**base, "p_sal_candidates": None}, p_sal=info["p_sal"])
    )
    assert torch.equal(cheap.w_hat, fixed.w_hat) and cheap.error == fixed.error
    assert cheap.info["refine_errors"] == fixed.info["refine_errors"]  # 3 = 2 iterations + start
    # On these heavy-tailed rows both searches take the largest share that fits.
    assert info["p_sal"] == full.info["p_sal"] == 0.01


@pytest.mark.parametrize("search", ["encoded", "refined"])
def test_layer_candidates_score_cheaply_and_finish_the_full_pipeline(search) -> None:
    """bivlm_candidates (what a model-wide allocation calls): with a cheap search every
    (share, rings) option carries quantize_bivlm's proxy error, and finishing one gives
    exactly quantize_bivlm's result at that share and ring count; with the full search the
    options are bivlm_options' final errors."""
    from bivlm_plugin.core.bivlm import bivlm_candidates, bivlm_options

    torch.manual_seed(8)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 384))
    h = _correlated_hessian(384, 8, tokens=768)
    base = dict(p_sal_candidates=(0.0, 0.01, 0.03), refine_iters=2, act_order=True)
    cands = bivlm_candidates(w, h, BiVLMConfig(**base, candidate_search=search), (1, 2))
    assert cands.keys == tuple((p, r) for r in (1, 2) for p in (0.0, 0.01, 0.03))
    assert cands.search == search
    ref = float(torch.einsum("ij,jk,ik->", w, h, w))
    for (p, r), (bits, err, rel) in zip(cands.keys, cands.options, strict=True):
        single = BiVLMConfig(**base, n_rings=r, candidate_search=search)
        one = quantize_bivlm(w, h, single)  # the same shares' proxies at this ring count
        assert err == pytest.approx(one.info["candidates"][p]["proxy_error"], rel=1e-6)
        assert one.info["candidates"][p]["storage_bits"] == bits
        assert rel == pytest.approx(err / ref, rel=1e-4)
    for i in (1, 5):
        p, r = cands.keys[i]
        got = cands.finish(i)
        fixed = {**base, "p_sal_candidates": None}
        want = quantize_bivlm(w, h, BiVLMConfig(**fixed, p_sal=p, n_rings=r))
        assert torch.equal(got.w_hat, want.w_hat) and got.error == want.error
        assert got.info["candidate_search"] == search and got.bits == want.bits
    with pytest.raises(IndexError):
        cands.finish(6)

    full = bivlm_candidates(w, h, BiVLMConfig(**base), (1, 2))
    opts = bivlm_options(w, h, BiVLMConfig(**base), (1, 2))
    assert [o[1] for o in full.options] == [r.error for r in opts]
    assert torch.equal(full.finish(4).w_hat, opts[4].w_hat)
    # The cheap proxies are pre-compensation errors: never below the finished ones here.
    assert all(c[1] >= f[1] for c, f in zip(cands.options, full.options, strict=True))


def test_cheap_search_still_names_the_smallest_achievable_budget() -> None:
    w = torch.randn(8, 576)
    cfg = BiVLMConfig(p_sal_candidates=(0.0, 0.01), bit_budget=1.0, candidate_search="encoded")
    with pytest.raises(ValueError, match=r"smallest achievable is 1\.0556"):
        quantize_bivlm(w, _correlated_hessian(576, 2), cfg)


def test_no_hessian_picks_by_frobenius() -> None:
    torch.manual_seed(6)
    w = torch.distributions.Laplace(0.0, 1.0).sample((8, 300))
    res = quantize_bivlm(w, None, BiVLMConfig(p_sal_candidates=(0.0, 0.03), refine_iters=1))
    errs = {p: c["error"] for p, c in res.info["candidates"].items()}
    assert errs[0.03] < errs[0.0] and res.info["p_sal"] == 0.03
    assert res.info["frobenius_error"] == pytest.approx(errs[0.03], rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(p_sal=0.7), "p_sal"),
        (dict(n_rings=0), "n_rings"),
        (dict(n_rings=1000), "n_rings"),
        (dict(stats="col"), "stats"),
        (dict(scale_mode="group"), "scale_mode"),
        (dict(mean_mode="none"), "mean_mode"),
        (dict(salient_metric="random"), "salient_metric"),
        (dict(refine_iters=-1), "refine_iters"),
        (dict(block_size=0), "block_size"),
        (dict(percdamp=1.5), "percdamp"),
        (dict(p_sal_candidates=()), "p_sal_candidates"),
        (dict(p_sal_candidates=(0.01, 2.0)), "p_sal_candidates"),
        (dict(bit_budget=-1.0), "bit_budget"),
        (dict(compensate="yes"), "compensate"),
        (dict(candidate_search="cheap"), "candidate_search"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        BiVLMConfig(**kwargs)


def test_candidates_list_becomes_tuple() -> None:
    assert BiVLMConfig(p_sal_candidates=[0.0, 0.01]).p_sal_candidates == (0.0, 0.01)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"2-D \(out, in\).*\(8,\)"):
        quantize_bivlm(torch.randn(8), None)
    with pytest.raises(ValueError, match=r"hessian must be \(in, in\) = \(8, 8\)"):
        quantize_bivlm(torch.randn(4, 8), torch.eye(7))
    with pytest.raises(ValueError, match="NaN"):
        quantize_bivlm(torch.full((4, 8), float("nan")), None)
    with pytest.raises(ValueError, match="BiVLMConfig"):
        quantize_bivlm(torch.randn(4, 8), None, {"p_sal": 0.01})
