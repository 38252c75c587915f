"""Property-based tests (``hypothesis``): bit packing, the packed format and every kernel
against the torch reference over random shapes, ring counts, salient counts, dtypes and
batch sizes.

The example-based tests beside these pin the awkward cases we know of; these search for the
ones we do not. Examples are derandomized (``conftest.py`` registers the profile) so CI is
reproducible; ``BIVLM_HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py`` searches
with fresh seeds and many more examples.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bivlm_plugin.core.binarize import dequantize  # noqa: E402
from bivlm_plugin.format import (  # noqa: E402
    BivlmLayout,
    dequantize_packed,
    fuse_rows,
    layout_of,
    pack,
    pack_bits,
    shard_columns,
    shard_rows,
    unpack,
    unpack_bits,
)
from bivlm_plugin.format.synthetic import random_codes  # noqa: E402
from bivlm_plugin.kernels.reference import binary_linear_reference  # noqa: E402

# Tolerances as in tests/kernels/test_kernel_cpu.py: fp32 accumulation in another order, then
# rounding to the output dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = st.sampled_from(list(TOL))


@st.composite
def layers(draw, max_out: int = 48, max_in: int = 300):
    """(codes, packed, layout) of a random valid packed layer."""
    o = draw(st.integers(1, max_out))
    i = draw(st.integers(1, max_in))
    n = draw(st.integers(1, 4))
    k = draw(st.integers(0, min(i, 12)))
    scale_mode = draw(st.sampled_from(["row_ring", "ring"]))
    mean_mode = draw(st.sampled_from(["row", "row_subset"]))
    seed = draw(st.integers(0, 2**16))
    codes = random_codes(o, i, n, k, scale_mode, mean_mode, seed=seed)
    return codes, pack(codes), layout_of(codes)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _x(batch: int, i: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(batch, i, generator=torch.Generator().manual_seed(seed)).to(dtype)


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 200),
    dtype=st.sampled_from([torch.int32, torch.uint8]),
    seed=st.integers(0, 2**16),
)
def test_pack_bits_round_trip(rows, cols, dtype, seed) -> None:
    bits = torch.rand((rows, cols), generator=torch.Generator().manual_seed(seed)) < 0.5
    words = pack_bits(bits, dtype)
    wb = 32 if dtype == torch.int32 else 8
    assert words.shape == (rows, -(-cols // wb)) and words.dtype == dtype
    assert torch.equal(unpack_bits(words, cols), bits)
    assert not unpack_bits(words, words.shape[1] * wb)[:, cols:].any()  # zero padding


@given(layer=layers())
def test_codes_pack_unpack_exact(layer) -> None:
    codes, packed, layout = layer
    layout.validate(packed)
    assert BivlmLayout.from_packed(packed, codes.shape[1]) == layout
    back = unpack(packed, layout)
    assert torch.equal(dequantize(back), dequantize(codes))
    assert torch.equal(dequantize_packed(packed, layout), dequantize(codes))


@given(layer=layers(), data=st.data())
def test_row_shards_fuse_back(layer, data) -> None:
    codes, packed, layout = layer
    o = layout.out_features
    cut = data.draw(st.integers(0, o))
    full = dequantize(codes)
    if cut in (0, o):
        sp, sl = shard_rows(packed, layout, 0, o)
        assert torch.equal(dequantize_packed(sp, sl), full)
        return
    a, b = shard_rows(packed, layout, 0, cut), shard_rows(packed, layout, cut, o)
    assert torch.equal(dequantize_packed(*a), full[:cut])
    assert torch.equal(dequantize_packed(*b), full[cut:])
    fp, fl = fuse_rows([a[0], b[0]], [a[1], b[1]])
    assert fl.out_features == o
    assert torch.equal(dequantize_packed(fp, fl), full)


@given(layer=layers(max_in=260), data=st.data())
def test_column_shards_sum_to_the_layer(layer, data) -> None:
    """Row-parallel shards on 32-column word boundaries: partial outputs sum to the full one."""
    codes, packed, layout = layer
    i = layout.in_features
    words = list(range(32, i, 32))
    bounds = sorted(set(data.draw(st.lists(st.sampled_from(words), max_size=3)))) if words else []
    cuts = [0, *bounds, i]
    x = _x(3, i, torch.float32, 0)
    ref = binary_linear_reference(x, packed, layout)
    parts = torch.zeros_like(ref)
    for a, b in zip(cuts, cuts[1:], strict=False):
        sp, sl = shard_columns(packed, layout, a, b)
        parts += binary_linear_reference(x[:, a:b], sp, sl)
    assert _rel_err(parts, ref) < 1e-5


@given(layer=layers(), batch=st.integers(1, 70), dtype=DTYPES, bias=st.booleans())
def test_kernels_match_the_reference(layer, batch, dtype, bias) -> None:
    """Every registered kernel that takes the input, and the op the integrations call (it
    chooses one), agree with the reference."""
    from bivlm_plugin.kernels.chooser import available_kernels
    from bivlm_plugin.kernels.ops import binary_linear

    codes, packed, layout = layer
    x = _x(batch, layout.in_features, dtype, batch)
    b = torch.randn(layout.out_features).to(dtype) if bias else None
    ref = binary_linear_reference(x, packed, layout, b)
    assert ref.dtype == dtype and ref.shape == (batch, layout.out_features)
    # The reference itself: x @ dequantized weight^T in float64.
    want = x.double() @ dequantize(codes).double().T + (0 if b is None else b.double())
    assert _rel_err(ref, want) < TOL[dtype]
    for kernel in available_kernels():
        if kernel.name == "triton" or not kernel.can_implement(x, layout)[0]:
            continue  # Triton: tests/kernels/test_kernel_triton.py (GPU or its interpreter)
        y = kernel.run(x, packed, layout, b)
        assert y.dtype == dtype and y.shape == ref.shape, kernel.name
        assert _rel_err(y, ref) < TOL[dtype], kernel.name
    y = binary_linear(x, packed, layout, b)
    assert _rel_err(y, ref) < TOL[dtype]


@given(layer=layers(), batch=st.integers(1, 6), dtype=DTYPES)
def test_prepared_cpu_layer_matches_the_reference(layer, batch, dtype) -> None:
    """The decode path the vLLM and transformers layers hold (GEMV with its salient plan)."""
    from bivlm_plugin.kernels import cpu

    if cpu._cpu_reason() or cpu.load_extension() is None:
        pytest.skip("the AVX512 kernel is not available here")
    _, packed, layout = layer
    fn = cpu.CpuKernel.prepare(packed, layout)
    if fn is None:
        return  # a layout the kernel does not serve (the op then answers)
    x = _x(batch, layout.in_features, dtype, 7)
    y = fn.linear(x)
    assert _rel_err(y, binary_linear_reference(x, packed, layout)) < TOL[dtype]
