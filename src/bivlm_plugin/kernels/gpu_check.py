"""Standalone GPU check of the Triton kernel: correctness vs the reference, timing vs cuBLAS.

``python -m bivlm_plugin.kernels.gpu_check --json OUT`` on a CUDA machine (needs only torch,
triton and this package's ``format/`` and ``kernels/``; about a minute on an H100):

1. correctness: Triton vs ``binary_linear_reference`` on awkward shapes, batches 1 / 3 / 17 / 64,
   fp32 / fp16 / bf16, 1 / 2 / 4 rings (relative error to the output norm);
2. timing: median of CUDA-event timings (after warmup) of the Triton kernel and of bf16
   ``F.linear`` (cuBLAS) at 4096x4096 and the SmolLM2 shapes, batch 1 / 8 / 64, written as
   ``speedup_vs_bf16`` per case; and the same calls replayed from a CUDA graph
   (``speedup_vs_bf16_graph``: GPU time without the Python launch cost).

``--interpret`` runs only step 1 on CPU tensors under TRITON_INTERPRET=1 (small shapes; the env
var must be set before triton is imported, so this flag sets it first thing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
# Few shapes: every (rings, dtype, batch block, salient width) combination is a Triton compile.
GPU_SHAPES = [(7, 33), (830, 545), (576, 1536)]
CPU_SHAPES = [(7, 33), (20, 100), (9, 70), (33, 300)]
TIMING_SHAPES = [(4096, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536)]


def check_correctness(device: str, shapes, batches, log=print) -> list[dict]:
    import torch

    from bivlm_plugin.format import layout_of, pack, shard_columns
    from bivlm_plugin.format.synthetic import random_codes
    from bivlm_plugin.kernels.reference import binary_linear_reference
    from bivlm_plugin.kernels.triton_kernel import TritonKernel

    modes = {1: ("row_ring", "row"), 2: ("ring", "row_subset"), 4: ("row_ring", "row_subset")}
    out = []
    for o, i in shapes:
        for n, (sm, mm) in modes.items():
            codes = random_codes(o, i, n, k=max(1, round(0.02 * i)), scale_mode=sm,
                                 mean_mode=mm, seed=o + n)  # fmt: skip
            packed, layout = pack(codes), layout_of(codes)
            if n == 2 and i > 64:  # a variable-k column shard too
                packed, layout = shard_columns(packed, layout, 32, i)
            packed = {k: v.to(device) for k, v in packed.items()}
            g = torch.Generator().manual_seed(o)
            for batch in batches:
                x32 = torch.randn(batch, layout.in_features, generator=g).to(device)
                bias = torch.randn(o, generator=g).to(device) if batch == 3 else None
                for name, tol in TOL.items():
                    x = x32.to(getattr(torch, name))
                    y = TritonKernel.run(x, packed, layout, bias)
                    ref = binary_linear_reference(x, packed, layout, bias)
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    case = {"out": o, "in": layout.in_features, "n_rings": n, "batch": batch,
                            "dtype": name, "rel_err": err, "tol": tol, "ok": err < tol}  # fmt: skip
                    if not case["ok"]:
                        log(f"FAIL {case}")
                    out.append(case)
    return out


def time_cases(shapes, batches, repeats: int = 50, warmup: int = 10) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from bivlm_plugin.format import layout_of, pack
    from bivlm_plugin.format.synthetic import random_codes
    from bivlm_plugin.kernels.triton_kernel import TritonKernel

    def med(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    def med_graph(fn, calls: int = 20) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return med(graph.replay) / calls

    out = []
    for o, i in shapes:
        codes = random_codes(o, i, 1, k=round(0.01 * i), seed=0)
        packed = {k: v.cuda() for k, v in pack(codes).items()}
        layout = layout_of(codes)
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
        for batch in batches:
            x = torch.randn(batch, i, device="cuda", dtype=torch.bfloat16)
            call_bin = functools.partial(TritonKernel.run, x, packed, layout, None)
            call_ref = functools.partial(F.linear, x, w)
            t_bin, t_ref = med(call_bin), med(call_ref)
            # The same calls replayed from a CUDA graph (as vLLM runs decode on GPUs): GPU time
            # without the Python launch cost, which dominates small calls above.
            g_bin, g_ref = med_graph(call_bin), med_graph(call_ref)
            out.append({"out": o, "in": i, "batch": batch, "triton_ms": t_bin,
                        "bf16_ms": t_ref, "speedup_vs_bf16": t_ref / t_bin,
                        "triton_graph_ms": g_bin, "bf16_graph_ms": g_ref,
                        "speedup_vs_bf16_graph": g_ref / g_bin})  # fmt: skip
            print(f"{o}x{i} batch {batch}: triton {t_bin:.4f} ms bf16 {t_ref:.4f} ms "
                  f"speedup {t_ref / t_bin:.2f}x; graphs: triton {g_bin:.4f} ms bf16 "
                  f"{g_ref:.4f} ms speedup {g_ref / g_bin:.2f}x", flush=True)  # fmt: skip
    return out


def _write(path: str | None, res: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Triton binary kernel check")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--interpret", action="store_true", help="CPU, TRITON_INTERPRET=1, no timing")
    args = ap.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    t0 = time.time()
    res: dict = {"torch": torch.__version__}
    if args.interpret:
        res["device"] = "cpu (TRITON_INTERPRET=1)"
        res["correctness"] = check_correctness("cpu", CPU_SHAPES, (1, 3, 17))
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --interpret for a CPU logic check", file=sys.stderr)
            return 2
        import triton

        res["device"] = torch.cuda.get_device_name()
        res["triton"] = triton.__version__
        res["timing"] = time_cases(TIMING_SHAPES, (1, 8, 64))
        _write(args.json, res)
        res["correctness"] = check_correctness("cuda", GPU_SHAPES, (1, 3, 64))
    res["all_ok"] = all(c["ok"] for c in res["correctness"])
    res["seconds"] = time.time() - t0
    print(f"correctness: {sum(c['ok'] for c in res['correctness'])}/{len(res['correctness'])} "
          f"ok; {res['seconds']:.1f} s")  # fmt: skip
    _write(args.json, res)
    return 0 if res["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
