"""``bivlm demo``: the main job, end to end on the reference VLM.

1. Build the reference VLM (``bivlm zoo build easyvqa-vlm``; cached).
2. Quantize it with the default whole-VLM Bi-VLM recipe through ``oneshot`` (cached by the
   recipe's text, the source build's fingerprint and the calibration settings).
3. Evaluate FP and quantized: P2 (easy-VQA test) and P1 of the language model (cached per
   model folder and protocol).
4. Serve the packed checkpoint with ``vllm serve`` on 127.0.0.1 with visual-token pruning at
   ``prune_ratio``; send one easy-VQA test image and its question through the OpenAI chat API;
   print the question, the served answer and the right one.
5. Time to first token and decode speed of image requests on that server and on the bf16
   source served the same way (same requests, one server after the other).
6. Print a summary table (storage bits from the files, sizes on disk, P1, P2, speed ratios).

Servers stop on exit, on errors and on Ctrl-C (``app/serve.py``). Every long step shows a
progress bar or a status line. Nothing here is a new protocol: P1 and P2 are ``eval/``'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bivlm_plugin.app.recipes import RECIPES_DIR, find_recipe
from bivlm_plugin.utils import atomic_write_text, compute_dtype

__all__ = ["MainJobConfig", "run_main_job"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = RECIPES_DIR / "bivlm_vlm_w2.yaml"
DEFAULT_PRUNE_RATIO = 0.75
DEFAULT_PRUNE_SCORE = "feature_norm"


@dataclass
class MainJobConfig:
    recipe: Path = DEFAULT_RECIPE
    zoo: str = "easyvqa-vlm"  # the reference VLM (tests use easyvqa-vlm-tiny)
    prune_ratio: float = DEFAULT_PRUNE_RATIO
    prune_score: str = DEFAULT_PRUNE_SCORE
    question: int = 0  # index into P2's questions: the one sent to the server
    timing_requests: int = 4
    decode_tokens: int = 16
    p2_limit: int | None = None  # None: P2 in full (2,000 questions)
    work: Path | None = None  # default $BIVLM_HOME/main_job
    log: list[str] = field(default_factory=list)


def _say(cfg: MainJobConfig, text: str) -> None:
    cfg.log.append(text)
    print(f"[bivlm demo] {text}", flush=True)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _folder_identity(folder: Path) -> str:
    """What identifies a model folder's content cheaply: its config, build / quant records and
    the sizes of its weight files."""
    parts = []
    for name in ("config.json", "bivlm_zoo.json", "bivlm_report.json"):
        f = folder / name
        parts.append(f.read_text() if f.is_file() else "")
    parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(folder.glob("*.safetensors"))]
    return _digest(*parts)


def _quantized(cfg: MainJobConfig, source: Path, work: Path) -> tuple[Path, bool]:
    from bivlm_plugin.app.quantize import (
        VLM_CALIBRATION_SAMPLES,
        VLM_CALIBRATION_TEXT_TOKENS,
        quantize_model,
    )

    recipe = Path(cfg.recipe)
    key = _digest(
        recipe.read_text(),
        _folder_identity(source),
        f"calib={VLM_CALIBRATION_SAMPLES}x{VLM_CALIBRATION_TEXT_TOKENS}",
    )
    out = work / "quantized" / f"{recipe.stem}-{key}"
    if (out / "bivlm_report.json").is_file():
        return out, True
    _say(cfg, f"quantizing with {recipe.name} (oneshot; minutes) -> {out}")
    quantize_model(source, recipe, out, overwrite=True)
    return out, False


def _evaluated(cfg: MainJobConfig, folder: Path, work: Path) -> tuple[dict[str, Any], bool]:
    """P2 and P1 of a model folder, cached by its identity."""
    key = _digest(_folder_identity(folder), f"p2_limit={cfg.p2_limit}")
    cache = work / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text()), True
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from bivlm_plugin.eval.data import p1_windows
    from bivlm_plugin.eval.ppl import perplexity
    from bivlm_plugin.eval.vqa import evaluate_vqa, load_vlm, p2_items

    _say(cfg, f"P2 and P1 of {folder.name} (minutes; cached afterwards)")
    model, processor = load_vlm(folder)
    p2 = evaluate_vqa(model, processor, p2_items(cfg.p2_limit))
    del model
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    p1 = perplexity(model, p1_windows(tok, "eval"))
    res = {
        "p2": p2.accuracy,
        "p2_questions": p2.n_questions,
        "p1": p1.ppl,
        "folder": str(folder),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(res, indent=2) + "\n")
    return res, False


def _png(item) -> bytes:
    return Path(item.image_path).read_bytes()


def _timed_requests(server, items, decode_tokens: int) -> dict[str, float]:
    """Median TTFT (max_tokens=1) and decode tokens/s ((M-1) / (wall(M) - TTFT)) over items."""
    from bivlm_plugin.app.serve import chat_image

    ttft, decode = [], []
    chat_image(server.url, server.model, _png(items[0]), items[0].question, 1)  # warm-up
    for it in items:
        t0 = time.perf_counter()
        chat_image(server.url, server.model, _png(it), it.question, 1)
        t1 = time.perf_counter()
        chat_image(server.url, server.model, _png(it), it.question, decode_tokens, ignore_eos=True)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        decode.append((decode_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return {"ttft_s": statistics.median(ttft), "decode_tok_s": statistics.median(decode)}


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_main_job(cfg: MainJobConfig | None = None) -> dict[str, Any]:
    """Run the main job; returns the summary (also written to WORK/summary.json)."""
    from bivlm_plugin.app.serve import VllmServer, chat_image
    from bivlm_plugin.eval.vqa import normalize_answer, p2_items
    from bivlm_plugin.pruning.scores import keep_count
    from bivlm_plugin.zoo import registry

    cfg = cfg or MainJobConfig()
    keep_count(1, cfg.prune_ratio)  # a bad ratio fails before any work, naming the range
    cfg.recipe = find_recipe(cfg.recipe)  # a path or a shipped name; fails naming both
    work = Path(cfg.work or registry.cache_root() / "main_job")
    items = p2_items(max(cfg.question + 1, cfg.timing_requests))
    start = time.perf_counter()

    _say(cfg, f"reference VLM: bivlm zoo build {cfg.zoo} (cached after the first build)")
    source = registry.build(cfg.zoo)
    packed, cached = _quantized(cfg, source, work)
    _say(cfg, f"packed checkpoint: {packed}{' (cached)' if cached else ''}")
    fp_eval, c1 = _evaluated(cfg, source, work)
    q_eval, c2 = _evaluated(cfg, packed, work)
    _say(
        cfg,
        f"evaluations{' (cached)' if c1 and c2 else ''}: FP P2 {fp_eval['p2']:.4f}, "
        f"packed P2 {q_eval['p2']:.4f}",
    )

    item = items[cfg.question]
    logs = work / "logs"
    _say(
        cfg,
        f"vllm serve {packed.name} on 127.0.0.1, pruning r={cfg.prune_ratio} "
        f"({cfg.prune_score}); starting (a minute or two)",
    )
    with VllmServer(
        packed, logs / "serve-packed.log", prune_ratio=cfg.prune_ratio, prune_score=cfg.prune_score
    ) as server:
        reply = chat_image(server.url, server.model, _png(item), item.question, 8)
        answer = reply["choices"][0]["message"]["content"]
        print(f"\n  image:    {item.image_path}\n  question: {item.question}")
        print(f"  served:   {answer!r}\n  right:    {item.answer!r}\n", flush=True)
        packed_speed = _timed_requests(server, items[: cfg.timing_requests], cfg.decode_tokens)
    _say(cfg, f"vllm serve of the dense source ({compute_dtype()}), same requests, for the ratios")
    with VllmServer(source, logs / "serve-bf16.log", prune_ratio=0.0) as server:
        bf16_speed = _timed_requests(server, items[: cfg.timing_requests], cfg.decode_tokens)

    report = json.loads((packed / "bivlm_report.json").read_text())
    summary = {
        "question": item.question,
        "served_answer": answer,
        "right_answer": item.answer,
        "correct": normalize_answer(answer) == normalize_answer(item.answer),
        "recipe": str(cfg.recipe),
        "prune_ratio": cfg.prune_ratio,
        "prune_score": cfg.prune_score,
        "storage_bits_from_files": report.get("storage_bits_from_files"),
        "weight_bits": report.get("weight_bits"),
        "disk_bytes": {"bf16": _disk_bytes(source), "packed": _disk_bytes(packed)},
        "p1": {"bf16": fp_eval["p1"], "packed": q_eval["p1"]},
        "p2": {"bf16": fp_eval["p2"], "packed": q_eval["p2"]},
        "p2_questions": q_eval["p2_questions"],
        "speed": {"bf16": bf16_speed, "packed": packed_speed},
        "ttft_ratio_vs_bf16": bf16_speed["ttft_s"] / packed_speed["ttft_s"],
        "decode_ratio_vs_bf16": packed_speed["decode_tok_s"] / bf16_speed["decode_tok_s"],
        "seconds": time.perf_counter() - start,
        # both servers and the P2 runs compute in this dtype ("bf16" keys name the source folder)
        "dtype": compute_dtype(),
        "packed": str(packed),
        "source": str(source),
    }
    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    mib = 1024 * 1024
    rows = [
        ("storage bits per quantized weight (files)", "16", f"{s['storage_bits_from_files']:.3f}"),
        (
            "weights on disk (MiB)",
            f"{s['disk_bytes']['bf16'] / mib:.1f}",
            f"{s['disk_bytes']['packed'] / mib:.1f}",
        ),
        ("P1 perplexity (language model)", f"{s['p1']['bf16']:.2f}", f"{s['p1']['packed']:.2f}"),
        (
            f"P2 accuracy ({s['p2_questions']} questions)",
            f"{s['p2']['bf16']:.4f}",
            f"{s['p2']['packed']:.4f}",
        ),
        (
            "vLLM time to first token, image request (s)",
            f"{s['speed']['bf16']['ttft_s']:.3f}",
            f"{s['speed']['packed']['ttft_s']:.3f}"
            f"  ({s['ttft_ratio_vs_bf16']:.2f}x the dense model's speed, pruning "
            f"r={s['prune_ratio']})",
        ),
        (
            "vLLM decode (tokens/s)",
            f"{s['speed']['bf16']['decode_tok_s']:.1f}",
            f"{s['speed']['packed']['decode_tok_s']:.1f}  ({s['decode_ratio_vs_bf16']:.2f}x dense)",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    dense = f"dense {s.get('dtype', 'bfloat16')}"
    lines = [f"{'':<{width}}  {dense:>16}  packed (Bi-VLM)", "-" * (width + 46)]
    lines += [f"{a:<{width}}  {b:>16}  {c}" for a, b, c in rows]
    lines.append(f"total {s['seconds']:.0f} s; summary: see summary.json beside the packed cache")
    return "\n".join(lines)
