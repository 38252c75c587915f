"""End to end (opt-in, ``-m integration``): quantize a tiny LLaMA, load the packed checkpoint in
vLLM's offline engine, and generate greedily: the tokens equal transformers' greedy tokens on
the same packed checkpoint (both run ``bivlm::binary_linear`` on the same packed tensors).

One engine start (~20-50 s on CPU) in a subprocess: vLLM spawns its engine core, and spawned
processes re-import ``__main__``, which must be guarded (``vllm_greedy_runner.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers with llm-compressor / transformers / c-t)

RUNNER = Path(__file__).with_name("vllm_greedy_runner.py")
MAX_TOKENS = 8
RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      targets: [Linear]
      ignore: [lm_head]
      p_sal: 0.02
      refine_iters: 1
      fold_scales: true  # as the ~1-bit recipe: scales folded into norms / v / up rows
"""


@pytest.fixture(scope="module")
def dense_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """Tiny LLaMA (head size 32: vLLM's CPU attention needs >= 32; widths divisible by 64 so a
    group-64 W4A16 peer exists), saved dense."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer) + 16,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    dense = tmp_path_factory.mktemp("dense_llama_vllm")
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)  # oneshot wants a path
    tiny_tokenizer.save_pretrained(dense)
    return dense


@pytest.fixture(scope="module")
def packed_dir(dense_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny LLaMA quantized with a Bi-VLM recipe and saved packed."""
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    oneshot_on_random_tokens(model, tiny_tokenizer, RECIPE, vocab=300)
    out = tmp_path_factory.mktemp("packed_llama_vllm")
    model.save_pretrained(out, save_compressed=True)
    tiny_tokenizer.save_pretrained(out)
    return out


def _transformers_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(MAX_TOKENS):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            out.append(ids[0, len(prompt) :].tolist())
    return out


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_vllm_greedy_tokens_equal_transformers(packed_dir: Path, tmp_path: Path, mode: str) -> None:
    """Eager runs the prepared kernel directly; compiled (vLLM's default) traces the layers
    into graphs that call the ``bivlm_cpu::packed_linear`` op."""
    cfg = json.loads((packed_dir / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "bivlm-binary" and cfg["quant_method"] == "compressed-tensors"
    prompts = [[5, 17, 42, 99, 7], [120, 3, 250, 64], [11, 12, 13, 14, 15, 16, 17]]
    want = _transformers_greedy(packed_dir, prompts)

    prompts_path, out_path = tmp_path / "prompts.json", tmp_path / "out.json"
    prompts_path.write_text(json.dumps(prompts))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # apply_model ships a function to the engine
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            str(packed_dir),
            str(prompts_path),
            str(out_path),
            str(MAX_TOKENS),
            mode,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"vLLM run failed ({elapsed:.0f} s):\n{proc.stderr[-6000:]}"
    got = json.loads(out_path.read_text())
    assert got["quantization"] == "bivlm"  # claimed by the override, no --quantization flag
    packed = got["packed"]
    # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj), fused q/k/v and gate/up.
    assert len(packed) == 8, packed
    assert all("weight" not in p["params"] and "signs" in p["params"] for p in packed.values())
    assert any(n.endswith("qkv_proj") for n in packed) and any(
        n.endswith("gate_up_proj") for n in packed
    )
    assert len({t for seq in want for t in seq}) > 3  # not a degenerate repeat of one token
    assert got["tokens"] == want, f"vLLM {got['tokens']} vs transformers {want}"


@pytest.mark.integration
def test_vllm_serve_answers_text_request(packed_dir: Path, tmp_path: Path) -> None:
    """`vllm serve DIR` (our launcher, no --quantization flag) on 127.0.0.1 answers a completion
    whose greedy tokens equal transformers' on the same packed checkpoint."""
    from vllm_serve_helpers import post_json, vllm_serve

    with vllm_serve(packed_dir, tmp_path / "serve.log") as (url, name):
        prompt = [5, 9, 14]
        res = post_json(
            f"{url}/v1/completions",
            {
                "model": name,
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
                "return_token_ids": True,
            },
        )
        choice = res["choices"][0]
        assert res["usage"]["completion_tokens"] == MAX_TOKENS
        want = _transformers_greedy(packed_dir, [prompt])[0]
        got = choice.get("token_ids")
        if got is not None:
            assert got == want
        else:  # older servers: compare decoded text
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(packed_dir)
            assert choice["text"] == tok.decode(want)


@pytest.mark.integration
def test_bench_serve_measures_bivlm_against_bf16_and_w4a16(
    packed_dir: Path, dense_dir: Path, tmp_path: Path
) -> None:
    """`bivlm bench serve` runs the three engines on the same prompts and reports the ratios
    from its own medians; each engine resolved the quantization it should have."""
    out = tmp_path / "serve.json"
    env = {**os.environ, "BIVLM_HOME": str(tmp_path / "home")}
    cmd = [str(Path(sys.executable).parent / "bivlm"), "bench", "serve", "--model", str(packed_dir)]
    cmd += ["--bf16", str(dense_dir), "--json", str(out), "--prompts", "2"]
    cmd += ["--prompt-tokens", "16", "--max-tokens", "6"]  # dtype auto: bf16 where W4A16 runs
    cmd += ["--eager", "--rounds", "1"]  # compiled engines are covered by the greedy test
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["bivlm"]["quantization"] == "bivlm"
    assert s["bf16"]["quantization"] is None
    from bivlm_plugin.eval.serve_bench import w4a16_unavailable
    from bivlm_plugin.utils import compute_dtype

    assert res["protocol"]["dtype"] == compute_dtype("auto")
    engines = ["bivlm", "bf16"]
    if w4a16_unavailable():  # an AVX2-only CPU: vLLM has no W4A16 kernel there
        assert "w4a16" not in s and "decode_vs_w4a16" not in res["ratios"]
        assert "cpu_gemm_wna16" in res["w4a16_unavailable"]
        assert "no W4A16 peer: vLLM's CPU W4A16 kernel" in proc.stdout
    else:
        engines.append("w4a16")
        assert s["w4a16"]["quantization"] == "compressed-tensors"
        w4 = json.loads(
            (
                tmp_path / "home" / "bench" / f"{dense_dir.name}-w4a16-g64" / "config.json"
            ).read_text()
        )["quantization_config"]
        assert w4["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    for name in engines:
        assert [len(r["decode_tok_s"]) for r in res["runs"][name]] == [2]  # 1 round, 2 prompts
        assert s[name]["decode_tok_s"] > 0 and s[name]["ttft_ms"] > 0
    assert len(res["ratios_per_round"]) == 1 and res["protocol"]["enforce_eager"] is True
    r = res["ratios"]
    assert r["decode_vs_bf16"] == pytest.approx(
        s["bivlm"]["decode_tok_s"] / s["bf16"]["decode_tok_s"]
    )
    assert r["ttft_vs_bf16"] == pytest.approx(s["bf16"]["ttft_ms"] / s["bivlm"]["ttft_ms"])
    if "w4a16" in engines:
        assert r["ttft_vs_w4a16"] == pytest.approx(s["w4a16"]["ttft_ms"] / s["bivlm"]["ttft_ms"])
    assert "bivlm decode:" in proc.stdout


def test_bench_serve_rejects_a_fake_quant_folder(dense_dir: Path) -> None:
    from bivlm_plugin.eval.serve_bench import bench_serve

    with pytest.raises(ValueError, match="not 'bivlm-binary'"):
        bench_serve(dense_dir)
