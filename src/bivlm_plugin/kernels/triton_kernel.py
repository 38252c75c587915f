"""Triton binary linear for GPUs on the packed layout (``format/layout.py``).

One program computes a (BLOCK_B, BLOCK_O) output tile. Per BLOCK_K column chunk it loads the
packed sign words and ring planes of BLOCK_O rows, expands them to the weight tile
w = mu_ring + alpha_ring * (+-1) in registers (the weight never exists dense in memory) and
accumulates in fp32: ``tl.dot`` on 16-row tiles from two rows up (x's dtype; fp32 inputs use
IEEE precision, not TF32), a broadcast multiply-sum for a single row. The salient correction
x_c * ((mu_s - mu_0) + (a1 - alpha_0) B1 + a2 B2) is added from the sparse per-row lists.

The kernel's logic runs on CPU tensors under ``TRITON_INTERPRET=1`` (tests); ``can_implement``
declines CPU tensors otherwise. Nothing imports triton until a call needs it.

Non-goals: split-K, autotuning beyond a few fixed block shapes, gemlite interop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import torch

from bivlm_plugin.format.layout import BivlmLayout

from .chooser import register_kernel

__all__ = ["TritonKernel", "triton_binary_linear"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RINGS = 4


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install triton"
    return ""


@functools.cache
def _kernel(interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it decorates: one compiled object per mode.
    import triton
    import triton.language as tl

    @triton.jit
    def binary_linear_kernel(
        x_ptr, y_ptr, signs_ptr, rings_ptr, scales_ptr, mean_ptr,
        idx_ptr, sscale_ptr, s2_ptr, cnt_ptr, bias_ptr,
        B, n_out, n_in, W, K, S2W, MC, stride_xb, stride_yb,
        N: tl.constexpr, NB: tl.constexpr, SCALE_ROW: tl.constexpr,
        HAS_SAL: tl.constexpr, HAS_CNT: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, WK: tl.constexpr,
        KS: tl.constexpr, USE_DOT: tl.constexpr, F32_IEEE: tl.constexpr,
    ):  # fmt: skip
        pid_o = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mo = offs_o < n_out
        mb = offs_b < B
        # Per-row ring parameters (N is tiny and constexpr).
        if SCALE_ROW:
            a0 = tl.load(scales_ptr + offs_o * N, mask=mo, other=0.0).to(tl.float32)
        else:
            a0 = tl.load(scales_ptr + offs_o * 0).to(tl.float32)
        mu0 = tl.load(mean_ptr + offs_o * MC, mask=mo, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
        bit = tl.arange(0, 32)
        for k0 in range(0, W * 32, BLOCK_K):
            offs_w = k0 // 32 + tl.arange(0, WK)
            mw = offs_w < W
            wmask = mo[:, None] & mw[None, :]
            sw = tl.load(signs_ptr + offs_o[:, None] * W + offs_w[None, :], mask=wmask, other=0)
            sb = ((sw[:, :, None] >> bit[None, None, :]) & 1).reshape(BLOCK_O, BLOCK_K)
            pm1 = sb.to(tl.float32) * 2.0 - 1.0
            if NB > 0:
                ring = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.int32)
                for p in tl.static_range(NB):
                    rp = tl.load(
                        rings_ptr + offs_o[:, None] * (NB * W) + p * W + offs_w[None, :],
                        mask=wmask,
                        other=0,
                    )
                    rb = ((rp[:, :, None] >> bit[None, None, :]) & 1).reshape(BLOCK_O, BLOCK_K)
                    ring = ring | (rb << p)
                alpha = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32) + a0[:, None]
                mu = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32) + mu0[:, None]
                for r in tl.static_range(1, N):
                    if SCALE_ROW:
                        ar = tl.load(scales_ptr + offs_o * N + r, mask=mo, other=0.0)
                    else:
                        ar = tl.load(scales_ptr + offs_o * 0 + r)
                    mr = tl.load(mean_ptr + offs_o * MC + r * (MC > 1), mask=mo, other=0.0)
                    alpha = tl.where(ring == r, ar.to(tl.float32)[:, None], alpha)
                    mu = tl.where(ring == r, mr.to(tl.float32)[:, None], mu)
                w = mu + alpha * pm1
            else:
                w = mu0[:, None] + a0[:, None] * pm1
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xmask = mb[:, None] & (offs_k[None, :] < n_in)
            xt = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=xmask, other=0.0
            )
            if USE_DOT:
                if F32_IEEE:
                    acc += tl.dot(xt.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
            else:
                prod = xt.to(tl.float32)[:, None, :] * w[None, :, :]
                acc += tl.sum(prod, axis=2)
        if HAS_SAL:
            offs_j = tl.arange(0, KS)
            if HAS_CNT:
                cnt = tl.load(cnt_ptr + offs_o, mask=mo, other=0).to(tl.int32)
            else:
                cnt = tl.zeros((BLOCK_O,), dtype=tl.int32) + K
            mj = mo[:, None] & (offs_j[None, :] < cnt[:, None])
            col = tl.load(idx_ptr + offs_o[:, None] * K + offs_j[None, :], mask=mj, other=0)
            col = col.to(tl.int32)
            sw = tl.load(signs_ptr + offs_o[:, None] * W + (col >> 5), mask=mj, other=0)
            b1 = ((sw >> (col & 31)) & 1).to(tl.float32) * 2.0 - 1.0
            s2 = tl.load(s2_ptr + offs_o[:, None] * S2W + (offs_j[None, :] >> 3), mask=mj, other=0)
            b2 = ((s2.to(tl.int32) >> (offs_j[None, :] & 7)) & 1).to(tl.float32) * 2.0 - 1.0
            mus = tl.load(mean_ptr + offs_o * MC + N * (MC > 1), mask=mo, other=0.0)
            a1 = tl.load(sscale_ptr + offs_o * 2, mask=mo, other=0.0).to(tl.float32)
            a2 = tl.load(sscale_ptr + offs_o * 2 + 1, mask=mo, other=0.0).to(tl.float32)
            coef = (mus.to(tl.float32) - mu0)[:, None] + (a1 - a0)[:, None] * b1 + a2[:, None] * b2
            coef = tl.where(mj, coef, 0.0)
            xg = tl.load(
                x_ptr + offs_b[:, None, None] * stride_xb + col[None, :, :],
                mask=mb[:, None, None] & mj[None, :, :],
                other=0.0,
            )
            acc += tl.sum(xg.to(tl.float32) * coef[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=mo, other=0.0).to(tl.float32)[None, :]
        ymask = mb[:, None] & mo[None, :]
        tl.store(
            y_ptr + offs_b[:, None] * stride_yb + offs_o[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=ymask,
        )

    return binary_linear_kernel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def triton_binary_linear(
    x: torch.Tensor,
    packed: Mapping[str, torch.Tensor],
    layout: BivlmLayout,
    bias: torch.Tensor | None = None,
    block_o: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """(B, I) x -> (B, O) in x.dtype with the Triton kernel (see module docstring)."""
    import triton

    x2 = x.reshape(-1, layout.in_features).contiguous()
    batch = x2.shape[0]
    y = torch.empty((batch, layout.out_features), dtype=x.dtype, device=x.device)
    # Two or more rows: one 16-row tile through tl.dot (tensor cores; rows past the batch are
    # masked). The broadcast multiply-sum is for a single row only: with 8 rows its (8, 32, 128)
    # product spilled registers (0.04x cuBLAS at batch 8 on the H100, 2026-11-27).
    use_dot = batch >= 2
    block_b = 16 if use_dot else 1
    if block_o is None:
        block_o = 64 if use_dot else 32
    if block_k is None:
        block_k = 64 if use_dot else 128
    k = layout.k
    dummy = packed["signs"]
    grid = (triton.cdiv(layout.out_features, block_o), triton.cdiv(batch, block_b))
    _kernel(_interpret())[grid](
        x2, y, packed["signs"], packed.get("rings", dummy), packed["scales"], packed["mean"],
        packed.get("salient_idx", dummy), packed.get("salient_scales", dummy),
        packed.get("salient_sign2", dummy), packed.get("salient_count", dummy),
        bias if bias is not None else dummy,
        batch, layout.out_features, layout.in_features, layout.words, k,
        packed["salient_sign2"].shape[1] if k else 1, packed["mean"].shape[1],
        x2.stride(0), y.stride(0),
        N=layout.n_rings, NB=layout.ring_bits, SCALE_ROW=layout.scale_mode == "row_ring",
        HAS_SAL=k > 0, HAS_CNT=layout.variable_k, HAS_BIAS=bias is not None,
        BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_K=block_k, WK=block_k // 32,
        KS=max(16, _next_pow2(k)),
        USE_DOT=use_dot,
        # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast there only.
        F32_IEEE=x.dtype == torch.float32 or (_interpret() and x.dtype == torch.bfloat16),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], layout.out_features)


@register_kernel
class TritonKernel:
    name = "triton"
    priority = 20

    @classmethod
    def can_implement(cls, x: torch.Tensor, layout: BivlmLayout) -> tuple[bool, str]:
        if x.device.type != "cuda" and not _interpret():
            return False, f"x is on {x.device}; Triton needs CUDA tensors (or TRITON_INTERPRET=1)"
        if x.dtype not in DTYPES:
            return False, f"x dtype {x.dtype} is not one of {DTYPES}"
        if layout.n_rings > MAX_RINGS:
            return False, f"n_rings={layout.n_rings} > {MAX_RINGS} is not supported"
        reason = _triton_reason()
        return (not reason), reason

    @classmethod
    def run(cls, x, packed, layout, bias):
        return triton_binary_linear(x, packed, layout, bias)
