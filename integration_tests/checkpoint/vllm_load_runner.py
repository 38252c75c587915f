"""Try to load each of several checkpoint folders in vLLM's offline engine, in one process.

Usage: python vllm_load_runner.py OUT_JSON DIR [DIR ...]
OUT_JSON receives, per folder, ``{"loaded": bool, "error": str | None, "type": str | None}``:
the exception ``LLM(...)`` raised, or that it loaded (and the quantization vLLM resolved).
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the caller), so
the exception is the one a user's ``LLM(...)`` call gets; ``vllm serve`` logs the same message.
"""

from __future__ import annotations

import gc
import json
import sys


def main(out_path: str, folders: list[str]) -> None:
    from vllm import LLM

    results = {}
    for folder in folders:
        try:
            llm = LLM(
                model=folder,
                dtype="float32",
                enforce_eager=True,
                max_model_len=64,
                seed=0,
                skip_tokenizer_init=True,  # the checkpoints hold weights only; prompts are ids
            )
        except Exception as exc:  # noqa: BLE001  (the message is what is checked)
            results[folder] = {"loaded": False, "error": str(exc), "type": type(exc).__name__}
            gc.collect()
            continue
        # Loaded: weights read into packed layers. No generation: this tiny LLaMA's head_dim of
        # 16 is below what vLLM's CPU attention supports on AVX2 (the end-to-end tests generate
        # with head_dim 32).
        results[folder] = {
            "loaded": True,
            "error": None,
            "type": None,
            "quantization": llm.llm_engine.model_config.quantization,
        }
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
