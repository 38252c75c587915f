"""The ``bivlm::binary_linear`` custom op, its fake impl, the chooser and the reference."""

from __future__ import annotations

import logging

import pytest
import torch

from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.format import layout_of, pack
from bivlm_plugin.format.synthetic import random_codes
from bivlm_plugin.kernels.chooser import choose_kernel
from bivlm_plugin.kernels.ops import binary_linear
from bivlm_plugin.kernels.reference import binary_linear_reference


@pytest.fixture(scope="module")
def layer():
    codes = random_codes(9, 70, 2, k=3, scale_mode="ring", mean_mode="row_subset", seed=1)
    return codes, pack(codes), layout_of(codes)


def test_reference_is_x_times_dequantized(layer) -> None:
    codes, packed, layout = layer
    x = torch.randn(4, 70, dtype=torch.float64).to(torch.float32)
    bias = torch.randn(9)
    want = x @ dequantize(codes).T + bias
    assert torch.equal(binary_linear_reference(x, packed, layout, bias), want)
    xb = x.to(torch.bfloat16)
    got = binary_linear_reference(xb, packed, layout)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (xb.float() @ dequantize(codes).T).to(torch.bfloat16))
    with pytest.raises(ValueError, match="input features"):
        binary_linear_reference(torch.zeros(1, 71), packed, layout)


@pytest.mark.parametrize("forced", ["reference", "cpu"])
def test_op_matches_reference(layer, forced, monkeypatch) -> None:
    _, packed, layout = layer
    if forced == "cpu":
        from bivlm_plugin.kernels import cpu

        if not cpu.CpuKernel.can_implement(torch.zeros(1, 70), layout)[0]:
            pytest.skip(cpu.CpuKernel.can_implement(torch.zeros(1, 70), layout)[1])
    monkeypatch.setenv("BIVLM_KERNEL", forced)
    x = torch.randn(2, 3, 70)
    y = binary_linear(x, packed, layout)
    ref = binary_linear_reference(x, packed, layout)
    assert y.shape == (2, 3, 9)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_op_fake_impl_and_opcheck(layer, monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, packed, layout = layer
    monkeypatch.setenv("BIVLM_KERNEL", "reference")
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = binary_linear(torch.empty(5, 70, dtype=torch.bfloat16), packed, layout)
    assert y.shape == (5, 9) and y.dtype == torch.bfloat16
    x = torch.randn(3, 70)
    args = (
        x,
        packed["signs"],
        packed["rings"],
        packed["scales"],
        packed["mean"],
        packed["salient_idx"],
        packed["salient_scales"],
        packed["salient_sign2"],
        None,
        None,
        70,
    )
    torch.library.opcheck(
        torch.ops.bivlm.binary_linear.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_chooser_env_and_debug_log(layer, monkeypatch, caplog) -> None:
    _, _, layout = layer
    x = torch.randn(1, 70)
    monkeypatch.setenv("BIVLM_KERNEL", "nope")
    with pytest.raises(ValueError, match="not a kernel"):
        choose_kernel(x, layout)
    monkeypatch.setenv("BIVLM_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="cannot run this call"):
        choose_kernel(x, layout)
    monkeypatch.delenv("BIVLM_KERNEL")
    with caplog.at_level(logging.DEBUG, logger="bivlm_plugin.kernels.chooser"):
        kern = choose_kernel(x, layout)
    from bivlm_plugin.kernels import cpu

    if cpu.CpuKernel.can_implement(x, layout)[0]:
        assert kern.name == "cpu"
    else:  # no AVX512 here: the chooser says why and takes the next kernel that can
        assert kern.name in ("dequant_gemm", "reference")
        assert "kernel cpu declined" in caplog.text
    assert "kernel triton declined" in caplog.text


def test_cli_bench_kernel_writes_speedups(tmp_path, capsys) -> None:
    import json

    from bivlm_plugin.cli import main
    from bivlm_plugin.kernels.cpu import load_extension

    out = tmp_path / "bench.json"
    argv = ["bench", "kernel", "--shapes", "64x96", "--batches", "1,3", "--repeats", "2"]
    argv += ["--json", str(out)]
    if load_extension() is None:  # no AVX512: the default kernel fails naming the ones that can
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "kernel 'cpu' cannot run" in err and "'dequant_gemm'" in err, err
        assert not out.exists()
        argv += ["--kernel", "dequant_gemm"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    cases = {(c["out"], c["in"], c["batch"]) for c in res["cases"]}
    assert cases == {(64, 96, 1), (64, 96, 3)}
    assert all(c["speedup_vs_bf16"] > 0 and c["speedup_vs_fp32"] > 0 for c in res["cases"])
    assert res["environment"]["packages"]["torch"]
    assert res["fast_bf16"] == res["environment"]["fast_bf16"]
    # The CPU kernel is timed as serving calls it (prepared once), where it builds.
    want = "prepared" if load_extension() is not None else "op"
    assert {c["path"] for c in res["cases"]} == {want}


def test_many_rows_prefer_dequant_gemm_and_match_reference(monkeypatch) -> None:
    from bivlm_plugin.format.codes import layout_of, pack
    from bivlm_plugin.format.synthetic import random_codes
    from bivlm_plugin.kernels import cpu
    from bivlm_plugin.kernels.reference import binary_linear_reference
    from bivlm_plugin.kernels.reference_kernel import DequantGemmKernel

    monkeypatch.delenv("BIVLM_KERNEL", raising=False)
    codes = random_codes(24, 70, n_rings=2, k=3, seed=3)
    packed, layout = pack(codes), layout_of(codes)
    many = torch.randn(2, 20, 70)  # 40 rows > CPU_MAX_ROWS
    assert (
        choose_kernel(many, layout) is DequantGemmKernel
        or not cpu.CpuKernel.can_implement(many, layout)[0]
    )
    assert choose_kernel(many, layout).name in ("dequant_gemm", "triton")
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        x = many.to(dtype)
        got = DequantGemmKernel.run(x, packed, layout, None).float()
        want = binary_linear_reference(x, packed, layout).float()
        assert float((got - want).norm() / want.norm()) < tol
    monkeypatch.setenv("BIVLM_CPU_MAX_ROWS", "64")
    if cpu.CpuKernel.can_implement(many, layout)[0]:
        assert choose_kernel(many, layout) is cpu.CpuKernel


def test_layer_cache_fast_path_matches_the_op_and_follows_new_tensors() -> None:
    from bivlm_plugin.kernels.cpu import load_extension

    if load_extension() is None:
        pytest.skip("the AVX512 kernel is not available here")
    codes = random_codes(48, 70, n_rings=2, k=3, seed=3)
    packed, layout = pack(codes), layout_of(codes)
    bias = torch.randn(48, dtype=torch.bfloat16)
    x = torch.randn(2, 70, dtype=torch.bfloat16)
    cache: dict = {}
    got = binary_linear(x, packed, layout, bias, cache)
    assert cache["cpu"] is not None  # the prepared direct call served it
    torch.testing.assert_close(got, binary_linear(x, packed, layout, bias), rtol=0, atol=0)
    # New storage (e.g. module.to(), load_state_dict(assign=True)): the cache is rebuilt.
    other = pack(random_codes(48, 70, n_rings=2, k=3, seed=4))
    torch.testing.assert_close(
        binary_linear(x, other, layout, bias, cache), binary_linear(x, other, layout, bias)
    )
    # Many rows go through the op (dequantize-then-GEMM), still equal to the reference.
    xs = torch.randn(40, 70)
    torch.testing.assert_close(
        binary_linear(xs, other, layout, None, {}),
        binary_linear_reference(xs, other, layout, None),
        rtol=1e-5,
        atol=1e-4,
    )
