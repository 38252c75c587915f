"""VLMs end to end (opt-in, ``-m integration``): quantize a tiny LLaVA and a tiny Qwen2-VL with
the whole-VLM recipe (`bivlm quantize`, easy-VQA calibration), load each packed checkpoint in
transformers and in vLLM (offline ``LLM`` and ``vllm serve`` with an image in a chat request):
greedy tokens on an easy-VQA image and question agree everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

import bivlm_plugin  # noqa: E402,F401
from tiny_vlms import (  # noqa: E402
    VLLM_QWEN_TEXT,
    VLLM_QWEN_VISION,
    VLLM_TEXT,
    VLLM_VISION,
    save_llava_with_processor,
    save_qwen2_vl_with_processor,
)

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("vllm_vlm_runner.py")
MAX_TOKENS = 6
# family -> (builder of a dense folder with its processor, vLLM name fragment of its vision tower)
FAMILIES = {
    "llava": (lambda p: save_llava_with_processor(p, VLLM_TEXT, VLLM_VISION), "vision_tower."),
    "qwen2_vl": (
        lambda p: save_qwen2_vl_with_processor(p, VLLM_QWEN_TEXT, VLLM_QWEN_VISION),
        "visual.",
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vlm_packed(family, tmp_path_factory) -> Path:
    """The family's tiny VLM quantized by `bivlm quantize` with the whole-VLM ~1-bit recipe."""
    from bivlm_plugin.cli import main

    root = tmp_path_factory.mktemp(f"{family}_vllm")
    src, out = root / "dense", root / "packed"
    FAMILIES[family][0](src)
    argv = ["quantize", "--model", str(src), "--recipe", str(REPO / "recipes/bivlm_vlm_w1.yaml")]
    assert main(argv + ["--output", str(out), "--num-calibration-samples", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def vqa_request(vlm_packed: Path, tmp_path_factory) -> dict:
    """An easy-VQA test image (saved as PNG) and its question as a chat message."""
    from transformers import AutoProcessor

    from bivlm_plugin.eval.vqa_data import easy_vqa_items

    item = easy_vqa_items("test", 1)[0]
    path = tmp_path_factory.mktemp("img") / "q0.png"
    item.image().convert("RGB").save(path)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
    ]
    processor = AutoProcessor.from_pretrained(vlm_packed)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"prompt": prompt, "image": str(path), "question": item.question}


def _transformers_greedy(folder: Path, req: dict) -> tuple[list[int], list[int]]:
    """(prompt ids after image expansion, greedy ids) from the packed checkpoint, no KV cache."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    assert any(isinstance(m, BinaryLinear) for m in model.modules())
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.open(req["image"]).convert("RGB")
    enc = processor(text=req["prompt"], images=[image], return_tensors="pt")
    model.generation_config.eos_token_id = None  # like vLLM's ignore_eos: exactly MAX_TOKENS
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    n = enc["input_ids"].shape[1]
    return enc["input_ids"][0].tolist(), ids[0, n:].tolist()


@pytest.mark.integration
def test_vlm_offline_vllm_equals_transformers(
    family: str, vlm_packed: Path, vqa_request: dict, tmp_path: Path
) -> None:
    report = json.loads((vlm_packed / "bivlm_report.json").read_text())
    assert {lay["part"] for lay in report["layers"]} == {"language", "vision"}
    _, want = _transformers_greedy(vlm_packed, vqa_request)

    req_path, out_path = tmp_path / "req.json", tmp_path / "out.json"
    req_path.write_text(json.dumps(vqa_request))
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    }
    cmd = [sys.executable, str(RUNNER), str(vlm_packed), str(req_path), str(out_path)]
    proc = subprocess.run(
        cmd + [str(MAX_TOKENS)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads(out_path.read_text())
    assert got["quantization"] == "bivlm"
    names = set(got["packed"])
    # Both towers run packed: the LM's fused projections and the vision encoder's.
    assert any(n.startswith("language_model") and n.endswith("qkv_proj") for n in names), names
    assert any(n.startswith(FAMILIES[family][1]) for n in names), names
    assert not any("multi_modal_projector" in n or ".merger." in n for n in names), names
    assert got["tokens"] == want, f"vLLM {got['tokens']} vs transformers {want}"


@pytest.mark.integration
def test_vlm_vllm_serve_answers_an_image_request(
    vlm_packed: Path, vqa_request: dict, tmp_path: Path
) -> None:
    """`vllm serve DIR` answers an OpenAI chat request with an inline (data URL) image; the
    prompt ids it built and its greedy ids equal transformers' on the same checkpoint."""
    from vllm_serve_helpers import image_chat_body, post_json, vllm_serve

    prompt_ids, want = _transformers_greedy(vlm_packed, vqa_request)
    with vllm_serve(vlm_packed, tmp_path / "serve.log") as (url, name):
        body = image_chat_body(
            name, Path(vqa_request["image"]).read_bytes(), vqa_request["question"], MAX_TOKENS
        )
        res = post_json(f"{url}/v1/chat/completions", body)
    assert res["prompt_token_ids"] == prompt_ids  # same chat rendering and image expansion
    assert res["choices"][0]["token_ids"] == want
