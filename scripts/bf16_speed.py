"""bf16 vs float32 matmul speed on this CPU, same process (why ``--dtype auto`` exists).

Usage: python scripts/bf16_speed.py [--json OUT]
Times a 512x576 @ 576x576 product (SmolLM2's hidden size) forward and forward + backward under
bf16 autocast and in float32, 20 calls each after a warm-up, and prints the ratios with
``utils.fast_bf16()``'s verdict.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, n: int = 20) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    from bivlm_plugin.utils import environment_info, fast_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    a, w = torch.randn(512, 576), torch.randn(576, 576)
    ab, wb = a.bfloat16(), w.bfloat16()
    wg = w.clone().requires_grad_(True)

    def train_step(autocast: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = (a @ wg).float().sum()
        y.backward()

    res = {
        "matmul_bf16_ms": 1e3 * _time(lambda: ab @ wb),
        "matmul_fp32_ms": 1e3 * _time(lambda: a @ w),
        "train_step_bf16_autocast_ms": 1e3 * _time(lambda: train_step(True)),
        "train_step_fp32_ms": 1e3 * _time(lambda: train_step(False)),
        "fast_bf16": fast_bf16(),
        "environment": environment_info(),
    }
    res["bf16_slowdown_matmul"] = res["matmul_bf16_ms"] / res["matmul_fp32_ms"]
    res["bf16_slowdown_train_step"] = res["train_step_bf16_autocast_ms"] / res["train_step_fp32_ms"]
    print(
        f"cpu {res['environment']['cpu_capability']}, fast_bf16={res['fast_bf16']}: bf16 matmul "
        f"{res['bf16_slowdown_matmul']:.1f}x the float32 time, autocast train step "
        f"{res['bf16_slowdown_train_step']:.1f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
