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
# Activation rows up to which the GEMV kernel runs; beyond, dequantize-then-GEMM. Measured with
# `bivlm bench kernel --batches 8,32` under BIVLM_CPU_MAX_ROWS=4 and =64 (the two paths, one
# thread, SmolLM2's shapes, 2026-11-27): the GEMV takes 0.03-0.07 ms vs 0.24-0.60 ms at 8 rows
# and 0.13-0.33 ms vs 0.26-0.70 ms at 32; `--batches 64,128` puts the crossover near 64 rows.
CPU_MAX_ROWS = 32
MAX_RINGS = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _register_fake(module) -> None:
    """Shape rule of ``bivlm_cpu::packed_linear`` (defined by the extension) for FakeTensor
    tracing (torch.compile, vLLM's compiled graphs): the registered layer's out_features (an
    unknown handle raises, naming it)."""

    @torch.library.register_fake("bivlm_cpu::packed_linear")
    def _(x, handle, bias=None):
        return x.new_empty((*x.shape[:-1], module.layer_out_features(handle)))


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
            _register_fake(_STATE["module"])
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
        """Decline many activation rows: dequantize-then-GEMM wins there (see CPU_MAX_ROWS)."""
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
    def prepare(cls, packed: Mapping[str, torch.Tensor], layout: BivlmLayout):
        """The extension's ``PackedLayer`` for one layer, or None when this kernel cannot serve
        it (the caller then uses the op).

        Its tensors are checked and their pointers taken once, so a call converts one argument
        (the op's per-call Python, layout and chooser cost as much as the 10-40 us of work at
        SmolLM2's shapes). ``fn(x, bias=None)`` returns None for inputs it does not take (more
        than ``BIVLM_CPU_MAX_ROWS`` rows, other dtypes or devices); ``fn.linear(x, bias=None)``
        takes any number of rows (dequantize-then-GEMM beyond the limit). ``register`` gives it
        a handle for the ``bivlm_cpu::packed_linear`` op, which compiled graphs call.
        """
        if os.environ.get("BIVLM_KERNEL", "").strip() not in ("", cls.name):
            return None
        signs = packed["signs"]
        probe = torch.empty(1, layout.in_features, dtype=torch.float32, device=signs.device)
        if not cls.can_implement(probe, layout)[0]:
            return None
        limit = int(os.environ.get("BIVLM_CPU_MAX_ROWS", CPU_MAX_ROWS))
        args = cls.arguments(packed, layout, None)
        return load_extension().PackedLayer(*args[:8], layout.in_features, args[-1], limit)

    @staticmethod
    def register(layer) -> int:
        """A handle for ``torch.ops.bivlm_cpu.packed_linear(x, handle, bias)`` (the prepared
        layer stays alive until ``release(handle)``)."""
        return load_extension().register_layer(layer)

    @staticmethod
    def release(handle: int) -> None:
        mod = _STATE.get("module")
        if mod is not None:
            mod.release_layer(handle)

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
