"""Plot P1 perplexity against storage bits for measured runs (scripts/p1_run.sh outputs).

Usage: python scripts/p1_plot.py OUT.png out/p1/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, paths: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in paths:
        res = json.loads(Path(path).read_text())
        q = res.get("quantization", {})
        name = Path(path).stem if q else "fp (bf16)"
        if name.startswith("abl_"):
            continue
        method = q.get("method", "fp")
        color = {"bivlm": "C0", "GPTQModifier": "C1"}.get(method, "C2")  # green: baselines and FP
        ax.scatter(q.get("storage_bits", 16), res["ppl"], color=color, zorder=3)
        ax.annotate(
            name,
            (q.get("storage_bits", 16), res["ppl"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per weight (every stored tensor counted)")
    ax.set_ylabel("P1 perplexity (WikiText-2 test, log scale)")
    ax.set_title(
        "SmolLM2-135M, decoder linears quantized (blue: Bi-VLM, orange: GPTQ, green: others)"
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
