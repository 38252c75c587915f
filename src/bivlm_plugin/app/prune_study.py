"""``bivlm analyze pruning``: the redundancy study of visual tokens.

For each model and each score, protocol P2 accuracy at each pruning ratio r (transformers,
``generate_with_pruning``), written as a table (JSON + Markdown) and a PNG plot (accuracy vs r, one
line per model and score); and vLLM's time to first token of an image request at a ratio vs
r = 0 on one model, in one run (each setting in its own engine subprocess, rounds interleaved).

Non-goals: choosing a default ratio (the README states what was measured).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bivlm_plugin.utils import atomic_write_text, environment_info, save_figure

__all__ = ["DEFAULT_RATIOS", "accuracy_sweep", "plot_sweep", "sweep_markdown", "vllm_ttft"]

logger = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99)


def accuracy_sweep(
    models: dict[str, Path],
    scores: list[str],
    ratios: list[float],
    limit: int | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """P2 accuracy of every (model, score, ratio); r = 0 is measured once per model.

    A score written ``NAME+merge`` (e.g. ``feature_norm+merge``) keeps the tokens ``NAME``
    chooses and merges the pruned ones into them (``merge_pruned``) instead of dropping them.
    """
    from bivlm_plugin.eval.vqa import evaluate_vqa, load_vlm, p2_items, plain_generate
    from bivlm_plugin.integrations.transformers.pruning import generate_with_pruning
    from bivlm_plugin.pruning.scores import SCORES, keep_count

    parsed = {}  # score as written -> (name in SCORES, merge)
    for s in scores:
        name, plus, mode = s.partition("+")
        if name not in SCORES or (plus and mode != "merge"):
            raise ValueError(
                f"unknown score {s!r}; choose from {sorted(SCORES)}, each optionally with "
                "'+merge' (e.g. feature_norm+merge)"
            )
        parsed[s] = (name, bool(plus))
    for r in ratios:
        keep_count(1, r)
    items = p2_items(limit)
    rows = []
    for name, folder in models.items():
        model, processor = load_vlm(folder)
        base = None
        for score in scores:
            for ratio in ratios:
                if ratio == 0.0 and base is not None:
                    res = base
                else:
                    generate = (
                        plain_generate
                        if ratio == 0.0
                        else functools.partial(
                            generate_with_pruning,
                            prune_ratio=ratio,
                            prune_score=parsed[score][0],
                            merge=parsed[score][1],
                        )
                    )
                    res = evaluate_vqa(
                        model, processor, items, batch_size=batch_size, generate=generate
                    )
                    if ratio == 0.0:
                        base = res
                rows.append(
                    {
                        "model": name,
                        "folder": str(Path(folder).resolve()),
                        "score": score,
                        "ratio": ratio,
                        "accuracy": res.accuracy,
                        "n_questions": res.n_questions,
                        "seconds": res.seconds,
                    }
                )
                logger.info("%s %s r=%.2f: P2 %.4f", name, score, ratio, res.accuracy)
    return rows


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    ratios = sorted({r["ratio"] for r in rows})
    head = "| model | score | " + " | ".join(f"r={r:g}" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (len(ratios) + 2)]
    keys = sorted({(r["model"], r["score"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for model, score in keys:
        acc = {
            r["ratio"]: r["accuracy"] for r in rows if (r["model"], r["score"]) == (model, score)
        }
        cells = " | ".join(f"{acc[r]:.4f}" if r in acc else "" for r in ratios)
        lines.append(f"| {model} | {score} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["model"], r["score"]) for r in rows})
    for model, score in keys:
        pts = sorted(
            (r["ratio"], r["accuracy"]) for r in rows if (r["model"], r["score"]) == (model, score)
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} / {score}")
    ax.set_xlabel("pruning ratio r (share of image tokens dropped)")
    ax.set_ylabel("P2 accuracy (easy-VQA test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def vllm_ttft(
    model: Path, ratio: float, score: str, requests: int = 8, rounds: int = 2
) -> dict[str, Any]:
    """vLLM time to first token of image requests at ``ratio`` vs 0, rounds interleaved.

    Each (round, ratio) runs in a fresh engine subprocess (``_ttft_runner.py``) that times
    ``generate(max_tokens=1)`` for each of the first ``requests`` P2 questions, one at a time,
    after one warm-up request. The ratio of medians over all requests of all rounds is reported.
    """
    runner = Path(__file__).with_name("_ttft_runner.py")
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    times: dict[float, list[float]] = {0.0: [], ratio: []}
    per_round = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(rounds):
            this = {}
            for r in (0.0, ratio):
                out = Path(tmp) / f"ttft_{rnd}_{r}.json"
                cmd = [sys.executable, str(runner), str(model), str(r), score, str(requests)]
                proc = subprocess.run(
                    cmd + [str(out)], env=env, capture_output=True, text=True, timeout=1200
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"vLLM TTFT run failed (r={r}):\n{proc.stderr[-4000:]}")
                got = json.loads(out.read_text())
                times[r] += got["ttft_s"]
                this[r] = statistics.median(got["ttft_s"])
            per_round.append(this[ratio] / this[0.0])
    med = {r: statistics.median(v) for r, v in times.items()}
    return {
        "model": str(Path(model).resolve()),
        "ratio": ratio,
        "score": score,
        "requests": requests,
        "rounds": rounds,
        "ttft_median_s": {str(k): v for k, v in med.items()},
        "ttft_ratio": med[ratio] / med[0.0],
        "ttft_ratio_per_round": per_round,
        "environment": environment_info(),
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
