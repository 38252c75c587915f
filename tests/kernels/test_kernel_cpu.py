"""The AVX512 CPU kernel against the reference over awkward shapes, batches, dtypes and rings.

Tolerance: ||y - y_ref|| / ||y_ref|| below 1e-5 (fp32 out), 2e-3 (fp16 out), 1e-2 (bf16 out):
both accumulate in fp32 in different orders, then round to the output dtype (bf16 keeps 8
mantissa bits: 2^-8 = 0.004 per element).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bivlm_plugin.format import layout_of, pack, shard_columns
from bivlm_plugin.format.synthetic import random_codes
from bivlm_plugin.kernels.reference import binary_linear_reference

SHAPES = [(1, 32), (7, 33), (64, 576), (576, 1536), (830, 545)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MODES = {1: ("row_ring", "row"), 2: ("ring", "row_subset"), 4: ("row_ring", "row_subset")}


@pytest.fixture(scope="module")
def cpu_kernel():
    from bivlm_plugin.kernels import cpu

    reason = cpu._cpu_reason()
    if reason:
        pytest.skip(reason)
    if cpu.load_extension() is None:
        pytest.skip(f"the AVX512 kernel did not build: {cpu._STATE.get('error')}")
    return cpu.CpuKernel


@functools.cache
def _layer(o: int, i: int, n: int):
    sm, mm = MODES[n]
    codes = random_codes(o, i, n, k=max(1, round(0.02 * i)), scale_mode=sm, mean_mode=mm, seed=o)
    return pack(codes), layout_of(codes)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n_rings", [1, 2, 4])
def test_cpu_kernel_matches_reference(cpu_kernel, shape, n_rings) -> None:
    packed, layout = _layer(*shape, n_rings)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(shape[0], generator=g)
    for batch in (1, 3, 8, 64):
        x32 = torch.randn(batch, shape[1], generator=g)
        for dtype, tol in TOL.items():
            x = x32.to(dtype)
            ok, reason = cpu_kernel.can_implement(x, layout)
            assert ok, reason
            b = bias if batch == 3 else None
            y = cpu_kernel.run(x, packed, layout, b)
            ref = binary_linear_reference(x, packed, layout, b)
            assert y.dtype == dtype and y.shape == (batch, shape[0])
            err = _rel_err(y, ref)
            assert err < tol, (batch, dtype, err)


def test_cpu_kernel_variable_k_shard_and_3d_input(cpu_kernel) -> None:
    codes = random_codes(40, 300, 2, k=7, seed=3)
    packed, layout = pack(codes), layout_of(codes)
    sp, sl = shard_columns(packed, layout, 64, 300)
    assert sl.variable_k
    x = torch.randn(2, 5, 236)
    err = _rel_err(cpu_kernel.run(x, sp, sl, None), binary_linear_reference(x, sp, sl))
    assert err < TOL[torch.float32]


def test_prepared_layers_match_reference(cpu_kernel, monkeypatch) -> None:
    """``CpuKernel.prepare`` (the decode path of the vLLM and transformers layers): few rows
    through the GEMV kernel with its salient plan (or gathers beyond 2^14 columns), bias per
    call, None for inputs it does not take."""
    monkeypatch.setenv("BIVLM_CPU_MAX_ROWS", "4")
    a = _layer(830, 545, 1)  # 2% salient, int16 indices, last row block partial
    b = _layer(64, 576, 2)
    codes = random_codes(40, 300, 4, k=7, seed=3)
    c = shard_columns(pack(codes), layout_of(codes), 64, 300)  # variable k, uint8 indices
    wide = random_codes(20, 16400, 1, k=40, seed=5)  # > 2^14 columns: no plan, gathers
    d = (pack(wide), layout_of(wide))
    g = torch.Generator().manual_seed(1)
    for packed, layout in (a, b, c, d):
        fn = cpu_kernel.prepare(packed, layout)
        # The salient plan: one int16 per salient weight, rows padded to 16 (none when wide).
        plan = -(-layout.out_features // 16) * 16 * layout.k * 2
        assert fn.extra_bytes == (plan if layout.in_features <= 1 << 14 else 0)
        bias = torch.randn(layout.out_features, generator=g)
        for batch in (1, 2, 4):
            for dtype, tol in TOL.items():
                x = torch.randn(batch, layout.in_features, generator=g).to(dtype)
                for bb in (None, bias.to(dtype)):
                    y = fn(x, bb)
                    ref = binary_linear_reference(x, packed, layout, bb)
                    assert y.dtype == dtype and y.shape == ref.shape
                    assert _rel_err(y, ref) < tol, (layout, batch, dtype)
        x3 = torch.randn(2, 2, layout.in_features)
        assert _rel_err(fn(x3), binary_linear_reference(x3, packed, layout)) < TOL[torch.float32]
        # Inputs it does not take come back as None (the caller then uses the op).
        assert fn(torch.randn(5, layout.in_features)) is None  # > BIVLM_CPU_MAX_ROWS
        assert fn(torch.randn(1, layout.in_features, dtype=torch.float64)) is None
        assert fn(torch.randn(1, layout.in_features + 1)) is None
        with pytest.raises(RuntimeError, match="bias has"):
            fn(torch.randn(1, layout.in_features), torch.zeros(layout.out_features + 1))
    # NaN in, NaN out (the vectorized bf16 rounding keeps NaN a NaN).
    packed, layout = a
    xn = torch.randn(1, layout.in_features, dtype=torch.bfloat16)
    xn[0, 3] = float("nan")
    assert torch.isnan(cpu_kernel.prepare(packed, layout)(xn)).all()


def test_packed_linear_op_any_rows_and_compiled(cpu_kernel) -> None:
    """``bivlm_cpu::packed_linear(x, handle, bias)``: the C++ op vLLM's compiled graphs call;
    few rows run the GEMV, many the dequantize-then-GEMM path; its fake implementation lets
    torch.compile trace it (fullgraph)."""
    packed, layout = _layer(64, 576, 2)
    fn = cpu_kernel.prepare(packed, layout)
    handle = cpu_kernel.register(fn)
    op = torch.ops.bivlm_cpu.packed_linear
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(64, generator=g)
    try:
        for rows in (1, 3, 40):
            for dtype, tol in TOL.items():
                x = torch.randn(rows, 576, generator=g).to(dtype)
                y = op(x, handle, bias.to(dtype))
                ref = binary_linear_reference(x, packed, layout, bias.to(dtype))
                assert y.dtype == dtype and _rel_err(y, ref) < 2 * tol, (rows, dtype)

        @torch.compile(fullgraph=True, backend="aot_eager")
        def f(x):
            return torch.relu(op(x, handle, bias))

        x = torch.randn(2, 576, generator=g)
        ref = torch.relu(binary_linear_reference(x, packed, layout, bias))
        assert _rel_err(f(x), ref) < TOL[torch.float32]
    finally:
        cpu_kernel.release(handle)
    with pytest.raises(RuntimeError, match="no prepared layer with handle"):
        op(torch.randn(1, 576), handle)


def test_cpu_kernel_declines_with_reasons(cpu_kernel) -> None:
    _, layout = _layer(7, 33, 1)
    ok, reason = cpu_kernel.can_implement(torch.zeros(1, 33, dtype=torch.float64), layout)
    assert not ok and "dtype" in reason
    from dataclasses import replace

    ok, reason = cpu_kernel.can_implement(torch.zeros(1, 33), replace(layout, n_rings=5))
    assert not ok and "n_rings" in reason


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n_rings", [1, 2, 4])
def test_cpu_dequantize_equals_the_format_dequantizer(cpu_kernel, shape, n_rings) -> None:
    """The prefill path's AVX512 dequantizer: fp32 bit-exact, bf16 = rounded fp32."""
    from bivlm_plugin.format.codes import dequantize_packed
    from bivlm_plugin.kernels.cpu import load_extension

    packed, layout = _layer(*shape, n_rings)
    args = cpu_kernel.arguments(packed, layout, None)[:-2]
    want = dequantize_packed(packed, layout)
    mod = load_extension()
    got = mod.dequantize_cpu(*args, layout.in_features, layout.n_rings, False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got16 = mod.dequantize_cpu(*args, layout.in_features, layout.n_rings, True)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, want.to(torch.bfloat16), rtol=0, atol=0)


def test_dequant_gemm_prefill_uses_it_and_matches_reference(cpu_kernel) -> None:
    from bivlm_plugin.kernels.reference_kernel import DequantGemmKernel

    codes = random_codes(40, 300, 2, k=7, seed=3)
    packed, layout = pack(codes), layout_of(codes)
    sp, sl = shard_columns(packed, layout, 64, 300)  # variable-k salient lists
    x = torch.randn(33, 236).to(torch.bfloat16)
    y = DequantGemmKernel.run(x, sp, sl, None)
    assert _rel_err(y, binary_linear_reference(x, sp, sl)) < TOL[torch.bfloat16]
