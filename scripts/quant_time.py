"""Quantization wall time of Bi-VLM recipes vs llm-compressor's GPTQ, measured in one process.

Each recipe quantizes a fresh copy of the model on the same calibration windows (P1's default,
or the first N), back to back, so all see the same machine load. Prints and writes the ratios.

Usage: python scripts/quant_time.py MODEL_DIR OUT.json [N_WINDOWS] [NAMES]
  NAMES: comma-separated subset of the recipes below (GPTQ W2A16 always runs first, as the
  ratios' base), e.g. bivlm_lm_w2.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "gptq_w2a16_g64": "recipes/gptq_w2a16_g64.yaml",
    "bivlm_lm_w1": "recipes/bivlm_lm_w1.yaml",
    "bivlm_lm_w2": "recipes/bivlm_lm_w2.yaml",
    "bivlm_lm_w3": "recipes/bivlm_lm_w3.yaml",
}
# P1's rows calibrate in float32 (RESULTS section 9); the timings use the same dtype.
CALIBRATION_DTYPE = "float32"


def main(
    model_dir: str, out: str, n_windows: int | None = None, names: list[str] | None = None
) -> None:
    from bivlm_plugin.app.quantize import quantize_model
    from bivlm_plugin.utils import atomic_write_text, environment_info

    unknown = sorted(set(names or ()) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe name(s) {unknown}; choose from {sorted(RECIPES)}")
    chosen = {"gptq_w2a16_g64"} | set(names or RECIPES)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in RECIPES.items():
            if name not in chosen:
                continue
            start = time.perf_counter()
            report = quantize_model(
                model_dir,
                recipe,
                Path(tmp) / name,
                num_calibration_samples=n_windows,
                calibration_dtype=CALIBRATION_DTYPE,
            )
            seconds[name] = {
                "oneshot_s": report["seconds"],
                # Bi-VLM only, inside oneshot_s: the modifier's per-layer quantization and
                # fold_scales' passes; the rest is llm-compressor's calibration / propagation.
                "layers_s": report.get("quantize_seconds"),
                "fold_s": report.get("fold_seconds"),
                "total_s": time.perf_counter() - start,
            }
    base = seconds["gptq_w2a16_g64"]["oneshot_s"]
    result = {
        "windows": n_windows or "P1 default",
        "calibration_dtype": CALIBRATION_DTYPE,
        "seconds": seconds,
        "ratio_vs_gptq_w2": {k: v["oneshot_s"] / base for k, v in seconds.items()},
        "command": " ".join(
            ["python scripts/quant_time.py", model_dir, out]
            + ([str(n_windows or '""'), ",".join(names)] if names else [str(n_windows or "")])
        ).strip(),
        "environment": environment_info(),
    }
    print(json.dumps(result["ratio_vs_gptq_w2"], indent=1))
    atomic_write_text(Path(out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    n = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] else None
    main(sys.argv[1], sys.argv[2], n, sys.argv[4].split(",") if len(sys.argv) > 4 else None)
