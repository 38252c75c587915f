"""AVX512 CPU kernel (``csrc/binary_gemv_avx512.cpp``), built lazily on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` the first time a call asks
for it (never at import) into ``$BIVLM_HOME/kernels`` (default ``~/.cache/bivlm/kernels``), in a
folder named by a hash of the source and flags, so later processes load it in well under a
second. A failed build is logged once with its reason; the chooser then falls back to the
reference.

Non-goals: AMX / VNNI paths, activation quantization (inputs stay float, accumulation fp32).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from bivlm_plugin.format.layout import BivlmLayout

from .chooser import register_kernel

__all__ = ["CpuKernel", "build_dir", "load_extension"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "binary_gemv_avx512.cpp"
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-fopenmp"]
CPU_MAX_ROWS = 4
MAX_RINGS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def build_dir() -> Path:
    """Where compiled kernels are cached: ``$BIVLM_HOME/kernels`` or ``~/.cache/bivlm/kernels``."""
    home = os.environ.get("BIVLM_HOME")
    root = Path(home) if home else Path.home() / ".cache" / "bivlm"
    return root / "kernels"


def _cpu_reason() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"the CPU capability is {cap}, the kernel needs AVX512 (F, BW, DQ, VL)"
    return ""


def load_extension():
    """The compiled module, or None (the reason is in ``_STATE['error']``). Builds once."""
    with _LOCK:
        if "module" in _STATE or "error" in _STATE:
            return _STATE.get("module")
        reason = _cpu_reason()
        if reason:
            _STATE["error"] = reason
            return None
        src = SOURCE.read_bytes()
        tag = hashlib.sha256(src + " ".join(CFLAGS).encode() + torch.__version__.encode())
        name = f"bivlm_binary_gemv_{tag.hexdigest()[:12]}"
        folder = build_dir() / name
        try:
            from torch.utils.cpp_extension import load

            folder.mkdir(parents=True, exist_ok=True)
            logger.info("building the AVX512 binary kernel in %s (first use only)", folder)
            _STATE["module"] = load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                verbose=False,
            )
        except Exception as exc:  # a compiler failure must not take the model down
            _STATE["error"] = f"building the AVX512 kernel failed: {type(exc).__name__}: {exc}"
            logger.warning("%s; falling back to the reference kernel", _STATE["error"])
            return None
        return _STATE["module"]


def _empty(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


@register_kernel
class CpuKernel:
    name = "cpu"
    priority = 10

    @classmethod
    def can_implement(cls, x: torch.Tensor, layout: BivlmLayout) -> tuple[bool, str]:
        if x.device.type != "cpu":
            return False, f"x is on {x.device}, the CPU kernel needs CPU tensors"
        if x.dtype not in DTYPES:
            return False, f"x dtype {x.dtype} is not one of {DTYPES}"
        if layout.n_rings > MAX_RINGS:
            return False, f"n_rings={layout.n_rings} > {MAX_RINGS} is not compiled"
        if load_extension() is None:
            return False, str(_STATE["error"])
        return True, ""

    @classmethod
    def worthwhile(cls, x: torch.Tensor, layout: BivlmLayout) -> tuple[bool, str]:
        """Decline many activation rows: dequantize-then-GEMM wins there (kernels/bench.py
        measured speedups below 1 from batch 8 on every SmolLM2 shape, 2026-11-27)."""
        rows = x.numel() // max(1, layout.in_features)
        limit = int(os.environ.get("BIVLM_CPU_MAX_ROWS", CPU_MAX_ROWS))
        if rows > limit:
            return False, (
                f"{rows} activation rows > {limit} (BIVLM_CPU_MAX_ROWS): dequantize-then-GEMM "
                "is faster there"
            )
        return True, ""

    @classmethod
    def run(
        cls,
        x: torch.Tensor,
        packed: Mapping[str, torch.Tensor],
        layout: BivlmLayout,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, layout.in_features).contiguous()
        y = load_extension().binary_linear_cpu(x2, *cls.arguments(packed, layout, bias))
        return y.reshape(*x.shape[:-1], layout.out_features)

    @classmethod
    def prepare(
        cls, packed: Mapping[str, torch.Tensor], layout: BivlmLayout, bias: torch.Tensor | None
    ):
        """A ``fn(x) -> y`` for one layer's few-row calls with its arguments built once, or
        None when this kernel cannot serve the layer (the caller then uses the op).

        Decode calls are small (20-50 us of work at SmolLM2's shapes) and the op's per-call
        Python (layout, chooser, argument checks) cost as much again: layers cache this.
        """
        if os.environ.get("BIVLM_KERNEL", "").strip() not in ("", cls.name):
            return None
        signs = packed["signs"]
        probe = torch.empty(1, layout.in_features, dtype=torch.float32, device=signs.device)
        if not cls.can_implement(probe, layout)[0]:
            return None
        fn, args = load_extension().binary_linear_cpu, cls.arguments(packed, layout, bias)
        limit = int(os.environ.get("BIVLM_CPU_MAX_ROWS", CPU_MAX_ROWS))
        in_f, out_f = layout.in_features, layout.out_features

        def run(x: torch.Tensor) -> torch.Tensor | None:
            if x.dtype not in DTYPES or x.numel() > limit * in_f:
                return None
            return fn(x.reshape(-1, in_f).contiguous(), *args).reshape(*x.shape[:-1], out_f)

        return run

    @staticmethod
    def arguments(
        packed: Mapping[str, torch.Tensor], layout: BivlmLayout, bias: torch.Tensor | None
    ) -> tuple:
        """The extension's arguments after ``x``, in its order."""
        dev = packed["signs"].device
        e32, e16 = _empty(dev, torch.int32), _empty(dev, torch.int16)
        return (
            packed["signs"].contiguous(),
            packed["rings"].contiguous() if "rings" in packed else e32,
            packed["scales"].contiguous(),
            packed["mean"].contiguous(),
            packed["salient_idx"].contiguous() if "salient_idx" in packed else e16,
            packed["salient_scales"].contiguous() if layout.k else _empty(dev, torch.float16),
            packed["salient_sign2"].contiguous() if layout.k else _empty(dev, torch.uint8),
            packed["salient_count"].contiguous() if layout.variable_k else e16,
            bias.to(torch.float32).contiguous() if bias is not None else _empty(dev, torch.float32),
            layout.n_rings,
        )
