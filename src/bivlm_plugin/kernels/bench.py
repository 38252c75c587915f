"""Same-process timing of the binary kernel against torch's bf16 ``F.linear`` (DESIGN.md 5).

``python -m bivlm_plugin.kernels.bench [--json OUT] [--repeats R]`` prints a table of medians
and speedups; ``run_kernel_bench`` returns them as a dict. Ratios, never absolute times alone:
the machines are shared and noisy.

Non-goals: GPU timing (``gpu_check.py``), end-to-end model throughput.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from bivlm_plugin.format.codes import layout_of, pack
from bivlm_plugin.format.synthetic import random_codes

from .chooser import available_kernels

__all__ = ["DEFAULT_BATCHES", "DEFAULT_SHAPES", "run_kernel_bench"]

# (out, in): 4096^2 and the SmolLM2-135M decoder linears (q/o, k/v, gate/up, down).
DEFAULT_SHAPES = ((4096, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536))
DEFAULT_BATCHES = (1, 8, 64)


def _median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_kernel_bench(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    batches: Sequence[int] = DEFAULT_BATCHES,
    kernel: str = "cpu",
    n_rings: int = 1,
    p_sal: float = 0.01,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 20,
    warmup: int = 3,
) -> dict:
    """Median time of ``kernel`` vs bf16 and float32 ``F.linear`` per shape and batch, in one
    process. Both peers are reported: on CPUs without native bf16 (AVX2-only) torch emulates the
    bf16 matmul and ``speedup_vs_bf16`` flatters any kernel; ``speedup_vs_fp32`` does not.

    Args:
        shapes: (out, in) layer shapes.
        batches: activation rows per call.
        kernel: registry name of the binary kernel to time (``"cpu"`` here).
        n_rings, p_sal: the binary layer's rings and salient share (k = round(p_sal * in)).
        dtype: activation dtype given to the binary kernel (F.linear always runs bf16).
        repeats, warmup: timed and untimed calls per measurement.

    Kernels with a ``prepare`` (the CPU one) are timed as serving calls them: the layer
    prepared once, then ``linear(x)`` per call (the GEMV up to ``BIVLM_CPU_MAX_ROWS`` rows,
    dequantize-then-GEMM beyond).

    Returns:
        {"kernel", "threads", "n_rings", "p_sal", "fast_bf16", "cases": [{"out", "in", "batch",
        "binary_ms", "bf16_ms", "fp32_ms", "speedup_vs_bf16", "speedup_vs_fp32", "path"}, ...]}.

    Raises ValueError naming the kernel, why it cannot run here and the kernels that can.
    """
    from bivlm_plugin.utils import fast_bf16

    by_name = {k.name: k for k in available_kernels()}
    if kernel not in by_name:
        raise ValueError(f"kernel {kernel!r} is not registered; choose from {sorted(by_name)}")
    kern = by_name[kernel]
    cases = []
    for out_f, in_f in shapes:
        codes = random_codes(out_f, in_f, n_rings=n_rings, k=round(p_sal * in_f), seed=0)
        packed, layout = pack(codes), layout_of(codes)
        prepare = getattr(kern, "prepare", None)
        prepared = prepare(packed, layout) if prepare is not None else None
        w_fp32 = torch.randn(out_f, in_f)
        w_bf16 = w_fp32.to(torch.bfloat16)
        for batch in batches:
            x = torch.randn(batch, in_f).to(dtype)
            xb, xf = x.to(torch.bfloat16), x.float()
            ok, reason = kern.can_implement(x, layout)
            if not ok:
                able = [k.name for k in by_name.values() if k.can_implement(x, layout)[0]]
                raise ValueError(
                    f"kernel {kernel!r} cannot run {layout} here: {reason}; choose one that "
                    f"can with --kernel: {able}"
                )
            if prepared is not None:  # what serving runs: GEMV up to its row limit, else
                call = functools.partial(prepared.linear, x)  # dequantize-then-GEMM
            else:
                call = functools.partial(kern.run, x, packed, layout, None)
            t_bin = _median_time(call, repeats, warmup)
            t_ref = _median_time(lambda xb=xb, w=w_bf16: F.linear(xb, w), repeats, warmup)
            t_f32 = _median_time(lambda xf=xf, w=w_fp32: F.linear(xf, w), repeats, warmup)
            cases.append(
                {
                    "out": out_f,
                    "in": in_f,
                    "batch": batch,
                    "binary_ms": t_bin * 1e3,
                    "bf16_ms": t_ref * 1e3,
                    "fp32_ms": t_f32 * 1e3,
                    "speedup_vs_bf16": t_ref / t_bin,
                    "speedup_vs_fp32": t_f32 / t_bin,
                    "path": "prepared" if prepared is not None else "op",
                }
            )
    return {
        "kernel": kernel,
        "threads": torch.get_num_threads(),
        "n_rings": n_rings,
        "p_sal": p_sal,
        "dtype": str(dtype),
        "fast_bf16": fast_bf16(),
        "cases": cases,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result dict here")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--n-rings", type=int, default=1)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,576x576")
    ap.add_argument("--batches", default=None, help="e.g. 1,8,64")
    ap.add_argument("--kernel", default="cpu", help="registry name of the kernel (default cpu)")
    args = ap.parse_args(argv)
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else DEFAULT_BATCHES
    res = run_kernel_bench(
        shapes, batches, kernel=args.kernel, n_rings=args.n_rings, repeats=args.repeats
    )
    print(f"kernel={res['kernel']} threads={res['threads']} n_rings={res['n_rings']}")
    if not res["fast_bf16"]:
        print("this CPU emulates bf16 matmuls: the bf16 peer is slow here, compare with fp32")
    for c in res["cases"]:
        print(
            f"{c['out']:>5}x{c['in']:<5} batch {c['batch']:>3}: binary {c['binary_ms']:.3f} ms"
            f"  bf16 {c['bf16_ms']:.3f} ms ({c['speedup_vs_bf16']:.2f}x)  fp32 {c['fp32_ms']:.3f}"
            f" ms ({c['speedup_vs_fp32']:.2f}x)"
        )
    if args.json:
        from pathlib import Path

        from bivlm_plugin.utils import atomic_write_text, environment_info

        res["environment"] = environment_info()
        atomic_write_text(Path(args.json), json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
