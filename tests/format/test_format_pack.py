"""Bit packing, layout, codes <-> packed round trips, shards and fusion."""

from __future__ import annotations

import math

import pytest
import torch

from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.core.bits import count_bits
from bivlm_plugin.format import (
    BivlmLayout,
    dequantize_packed,
    fuse_rows,
    layout_of,
    pack,
    pack_bits,
    shard_columns,
    shard_rows,
    storage_bits,
    unpack,
    unpack_bits,
)
from bivlm_plugin.format.synthetic import random_codes

SHAPES = [(830, 545), (342, 512), (3, 1), (7, 33), (5, 32), (4, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_pack_bits_round_trip(shape, dtype) -> None:
    bits = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5
    words = pack_bits(bits, dtype)
    wb = 32 if dtype == torch.int32 else 8
    assert words.dtype == dtype and words.shape == (shape[0], math.ceil(shape[1] / wb))
    assert torch.equal(unpack_bits(words, shape[1]), bits)
    # Padding bits are zero: unpacking the full words shows nothing past n.
    assert not unpack_bits(words, words.shape[1] * wb)[:, shape[1] :].any()


def test_pack_bits_order() -> None:
    bits = torch.zeros(1, 70, dtype=torch.bool)
    bits[0, [0, 3, 31, 32, 69]] = True
    w = pack_bits(bits)
    assert w.tolist() == [[1 + 8 - 2**31, 1, 1 << 5]]


CASES = [
    # (O, I, n_rings, k, scale_mode, mean_mode)
    (830, 545, 1, 5, "row_ring", "row"),
    (342, 512, 2, 5, "ring", "row_subset"),
    (3, 1, 1, 0, "row_ring", "row"),
    (7, 33, 4, 2, "row_ring", "row_subset"),
    (7, 33, 3, 9, "ring", "row"),
    (64, 256, 2, 3, "row_ring", "row"),
]


def _codes(case, seed=0):
    o, i, n, k, sm, mm = case
    return random_codes(o, i, n, k, sm, mm, seed=seed)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_codes_round_trip_exact(case) -> None:
    codes = _codes(case)
    packed = pack(codes)
    layout = layout_of(codes)
    layout.validate(packed)
    assert BivlmLayout.from_packed(packed, codes.shape[1]) == layout
    back = unpack(packed, layout)
    for f in ("signs", "ring", "salient_idx", "salient_sign2", "alpha_ring", "mu"):
        assert torch.equal(getattr(back, f), getattr(codes, f)), f
    if layout.k:
        assert torch.equal(back.alpha_sal, codes.alpha_sal)
    assert torch.equal(dequantize_packed(packed, layout), dequantize(codes))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_storage_bits_matches_count_bits(case) -> None:
    codes = _codes(case)
    packed, layout = pack(codes), layout_of(codes)
    o, i = codes.shape
    w = layout.words
    pad = o * (32 * w - i) * (1 + layout.ring_bits)
    if layout.k:
        pad += o * (8 * math.ceil(layout.k / 8) - layout.k) - 16
    want = count_bits(codes).storage_bits + pad / (o * i)
    assert storage_bits(packed, layout) == pytest.approx(want, rel=1e-12)
    assert layout.storage_bytes() * 8 / (o * i) == pytest.approx(want, rel=1e-12)
    for name, spec in layout.specs().items():
        assert spec.row_dim in (0, None), name


def test_quantizer_codes_pack_exactly() -> None:
    from bivlm_plugin.core.bivlm import BiVLMConfig, quantize_bivlm

    torch.manual_seed(0)
    w = torch.randn(24, 70)
    x = torch.randn(128, 70)
    h = 2 * x.T @ x / 128
    res = quantize_bivlm(w, h, BiVLMConfig(n_rings=2, p_sal=0.05, refine_iters=1))
    packed, layout = pack(res.codes), layout_of(res.codes)
    assert layout.k == round(0.05 * 70)
    assert torch.equal(dequantize_packed(packed, layout), dequantize(res.codes))
    assert torch.equal(dequantize_packed(packed, layout), res.w_hat)


def test_variable_k_and_fp16_rules_raise() -> None:
    from dataclasses import replace

    codes = _codes((6, 40, 1, 3, "row_ring", "row"))
    idx = codes.salient_idx.clone()
    idx[0, 2] = -1
    bad = replace(codes, salient_idx=idx)
    with pytest.raises(ValueError, match="salient_select='topk'"):
        pack(bad)
    with pytest.raises(ValueError, match="round_params_fp16"):
        pack(replace(codes, mu=codes.mu + 1e-7))


@pytest.mark.parametrize("case", CASES[:2] + CASES[3:5], ids=str)
def test_shard_rows(case) -> None:
    codes = _codes(case)
    packed, layout = pack(codes), layout_of(codes)
    full = dequantize(codes)
    o = codes.shape[0]
    for a, b in [(0, o // 2 or 1), (o // 3, o)]:
        sp, sl = shard_rows(packed, layout, a, b)
        assert torch.equal(dequantize_packed(sp, sl), full[a:b])


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]], ids=str)
def test_shard_columns(case) -> None:
    codes = _codes(case)
    packed, layout = pack(codes), layout_of(codes)
    full = dequantize(codes)
    i = codes.shape[1]
    cuts = sorted({0, *range(32, i, 64), i})
    total = torch.zeros_like(full)
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        sp, sl = shard_columns(packed, layout, a, b)
        part = dequantize_packed(sp, sl)
        assert torch.equal(part, full[:, a:b]), (a, b)
        total[:, a:b] = part
        # A shard of a shard still works (variable-k input).
        if b - a > 32:
            sp2, sl2 = shard_columns(sp, sl, 32, b - a)
            assert torch.equal(dequantize_packed(sp2, sl2), full[:, a + 32 : b])
    assert torch.equal(total, full)
    with pytest.raises(ValueError, match="word boundaries"):
        shard_columns(packed, layout, 1, i)


def test_fuse_rows_matches_concat() -> None:
    parts = [
        _codes((9, 100, 2, 3, "ring", "row"), seed=1),
        _codes((5, 100, 2, 1, "row_ring", "row_subset"), seed=2),
        _codes((4, 100, 2, 0, "row_ring", "row"), seed=3),
    ]
    packed = [pack(c) for c in parts]
    layouts = [layout_of(c) for c in parts]
    fp, fl = fuse_rows(packed, layouts)
    assert fl == BivlmLayout.fuse(layouts)
    assert fl.out_features == 18 and fl.k == 3 and fl.variable_k
    want = torch.cat([dequantize(c) for c in parts])
    assert torch.equal(dequantize_packed(fp, fl), want)
    # Shards of a fused layer are shards of the concatenation.
    sp, sl = shard_rows(fp, fl, 7, 16)
    assert torch.equal(dequantize_packed(sp, sl), want[7:16])
    # Equal fixed-k parts fuse without counts.
    same = [_codes((3, 64, 1, 2, "row_ring", "row"), seed=s) for s in (4, 5)]
    fp2, fl2 = fuse_rows([pack(c) for c in same], [layout_of(c) for c in same])
    assert not fl2.variable_k and "salient_count" not in fp2
    with pytest.raises(ValueError, match="same n_rings"):
        BivlmLayout.fuse([layouts[0], BivlmLayout(3, 100, n_rings=1)])


def test_layout_validation_messages() -> None:
    with pytest.raises(ValueError, match="split the layer"):
        BivlmLayout(4, 40000)
    lay = BivlmLayout(4, 40, n_rings=2, k=2)
    with pytest.raises(ValueError, match="do not match"):
        lay.validate({"signs": torch.zeros(4, 2, dtype=torch.int32)})
    specs = lay.specs()
    assert specs["signs"].shape == (4, 2) and specs["rings"].shape == (4, 2)
    assert specs["salient_idx"].dtype == torch.uint8
    assert BivlmLayout(4, 300, k=1).specs()["salient_idx"].dtype == torch.int16
