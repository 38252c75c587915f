"""Tensor parallelism for real: vLLM with ``tensor_parallel_size=2`` on this CPU (two worker
processes, one core each: ``VLLM_CPU_OMP_THREADS_BIND=0|1``) serving a tiny packed LLaMA whose
row-parallel shards fall on the 32-column pack words gives the greedy tokens of
``tensor_parallel_size=1``, each rank holding half of every packed layer; a model whose shards
would not fall on them fails at load naming the layer and the sizes that would work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")

# Opt-in (`bash scripts/test.sh -m slow integration_tests/vllm/test_vllm_tensor_parallel.py`):
# three engine starts, two of them with two workers (about 6 min on the shared 2 cores), which
# the default CI run cannot afford within its budget.
pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("vllm_greedy_runner.py")
MAX_TOKENS = 8
PROMPTS = [[5, 17, 42, 99, 7], [120, 3, 250, 64], [11, 12, 13, 14, 15, 16, 17]]
from test_vllm_end_to_end import RECIPE  # noqa: E402  (the same small Bi-VLM recipe)


def _packed_llama(tokenizer, root: Path, intermediate: int) -> Path:
    """A tiny LLaMA (hidden 128, 4 heads / 2 key-value heads of 32) quantized and saved packed."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from oneshot_helpers import oneshot_on_random_tokens

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 16,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    dense = root / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    oneshot_on_random_tokens(model, tokenizer, RECIPE, vocab=300)
    out = root / "packed"
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return out


def _run(folder: Path, tmp_path: Path, tp: int) -> tuple[subprocess.CompletedProcess, dict | None]:
    prompts_path, out_path = tmp_path / f"prompts{tp}.json", tmp_path / f"out{tp}.json"
    prompts_path.write_text(json.dumps(PROMPTS))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    if tp > 1:
        # One OpenMP thread per worker, bound to its own core (vLLM's CPU default binds by NUMA
        # node, and this machine has one node for two workers).
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(tp))
    cmd = [sys.executable, str(RUNNER), str(folder), str(prompts_path), str(out_path)]
    cmd += [str(MAX_TOKENS), "eager", str(tp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out_path.read_text()) if proc.returncode == 0 else None)


@pytest.mark.integration
def test_tp2_gives_the_tokens_of_tp1(tiny_tokenizer, tmp_path_factory, tmp_path) -> None:
    folder = _packed_llama(tiny_tokenizer, tmp_path_factory.mktemp("tp_ok"), intermediate=256)
    proc1, one = _run(folder, tmp_path, 1)
    assert proc1.returncode == 0, proc1.stderr[-6000:]
    proc2, two = _run(folder, tmp_path, 2)
    assert proc2.returncode == 0, proc2.stderr[-6000:]
    assert two["quantization"] == "bivlm"
    assert len({t for seq in one["tokens"] for t in seq}) >= 3  # not one repeated token
    assert two["tokens"] == one["tokens"], f"TP=2 {two['tokens']} vs TP=1 {one['tokens']}"
    # Two workers, each holding every packed layer at half its TP=1 shape (rows split for
    # column-parallel layers, input columns for row-parallel ones: the shards are real).
    assert len(two["packed_per_rank"]) == 2
    full = one["packed"]
    for rank in two["packed_per_rank"]:
        assert set(rank) == set(full) and len(rank) == 8
        for name, layer in rank.items():
            assert "weight" not in layer["params"], name
            o, i = _shape(layer["layout"])
            fo, fi = _shape(full[name]["layout"])
            assert o * i * 2 == fo * fi and (o, i) in ((fo // 2, fi), (fo, fi // 2)), name
            assert layer["bytes"] < full[name]["bytes"], name


def _shape(layout_repr: str) -> tuple[int, int]:
    o = re.search(r"out_features=(\d+)", layout_repr)
    i = re.search(r"in_features=(\d+)", layout_repr)
    return int(o.group(1)), int(i.group(1))


@pytest.mark.integration
def test_shards_off_the_pack_words_fail_at_load_naming_the_layer(
    tiny_tokenizer, tmp_path_factory, tmp_path
) -> None:
    """intermediate 288: each of two ranks would hold 144 of down_proj's input columns, not a
    multiple of 32; 3 ranks (96) or 9 (32) would work."""
    folder = _packed_llama(tiny_tokenizer, tmp_path_factory.mktemp("tp_bad"), intermediate=288)
    proc, _ = _run(folder, tmp_path, 2)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr  # the worker's error reaches either stream
    assert "mlp.down_proj (tensor_parallel_size=2)" in out, out[-6000:]
    assert "tensor_parallel_size values that work for this layer: [1, 3, 9]" in out
