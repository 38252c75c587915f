"""Visual-token pruning in vLLM (opt-in, ``-m integration``): a tiny random LLaVA whose config
carries ``bivlm_pruning``; vLLM's offline engine and ``vllm serve`` give the greedy tokens that
transformers gives with the same pruning (``generate_with_pruning``), the prompt holds exactly
the kept placeholders, and a serving-time override turns pruning off. Bad settings fail at load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

from bivlm_plugin.pruning.scores import keep_count  # noqa: E402
from tiny_vlms import VLLM_TEXT, VLLM_VISION, save_llava_with_processor  # noqa: E402

MAX_TOKENS = 6
RATIO = 0.75  # 16 image tokens -> 4
LOGPROB_ATOL = 1e-5  # float32 on both sides (the Qwen tests' bound)


def _set_pruning(folder: Path, entry: dict | None) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("bivlm_pruning", None)
    if entry is not None:
        cfg["bivlm_pruning"] = entry
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def request_and_image(tmp_path_factory) -> tuple[Path, dict]:
    from transformers import AutoProcessor

    from bivlm_plugin.eval.vqa_data import easy_vqa_items
    from bivlm_plugin.format.serving_keys import rewrite_checkpoint_keys

    folder = tmp_path_factory.mktemp("llava_prune") / "dense"
    save_llava_with_processor(folder, VLLM_TEXT, VLLM_VISION)
    rewrite_checkpoint_keys(folder)  # the published LLaVA key layout vLLM loads
    item = easy_vqa_items("test", 1)[0]
    png = folder.parent / "q0.png"
    item.image().save(png)
    processor = AutoProcessor.from_pretrained(folder)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    return folder, {"prompt": prompt, "image": str(png), "question": item.question}


def _transformers_pruned(
    folder: Path, req: dict, score: str, ratio: float, merge: bool = False, logprobs: bool = False
) -> list[int] | tuple[list[int], list[float]]:
    """Greedy ids from transformers' pruning (and their log-probabilities with ``logprobs``)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_serve_helpers import pruned_greedy

    processor = AutoProcessor.from_pretrained(folder)
    enc = processor(
        text=req["prompt"], images=[Image.open(req["image"]).convert("RGB")], return_tensors="pt"
    )
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, lps = pruned_greedy(model, enc, ratio, score, merge, MAX_TOKENS)
    return (tokens, lps) if logprobs else tokens


def _offline(folder: Path, req: dict, tmp_path: Path):
    from vllm_serve_helpers import run_vlm_runner

    return run_vlm_runner(folder, req, tmp_path, MAX_TOKENS)


@pytest.mark.integration
@pytest.mark.parametrize(
    "score, merge", [("feature_norm", False), ("cls_attention", False), ("cls_attention", True)]
)
def test_offline_pruned_tokens_equal_transformers(
    request_and_image, score, merge, tmp_path
) -> None:
    folder, req = request_and_image
    _set_pruning(folder, {"ratio": RATIO, "score": score, "merge": merge})
    want, want_lp = _transformers_pruned(folder, req, score, RATIO, merge, logprobs=True)
    proc, result = _offline(folder, req, tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert result["tokens"] == want, f"vLLM {result['tokens']} vs transformers {want}"
    torch.testing.assert_close(result["logprobs"], want_lp, atol=LOGPROB_ATOL, rtol=0)
    if merge:  # vLLM merged: its log-probabilities are not those of dropping the tokens
        _, drop_lp = _transformers_pruned(folder, req, score, RATIO, logprobs=True)
        gap = max(abs(a - b) for a, b in zip(result["logprobs"], drop_lp, strict=True))
        assert gap > 10 * LOGPROB_ATOL, f"merged and dropped log-probs within {gap}"


@pytest.mark.integration
def test_served_pruned_and_override(request_and_image, tmp_path) -> None:
    """`vllm serve` honours the checkpoint's setting (k placeholders in the prompt, transformers'
    pruned tokens) and `--hf-overrides` turns it off."""
    from vllm_serve_helpers import image_chat_body, post_json, vllm_serve

    folder, req = request_and_image
    _set_pruning(folder, {"ratio": RATIO, "score": "feature_norm"})
    want = _transformers_pruned(folder, req, "feature_norm", RATIO)
    png = Path(req["image"]).read_bytes()
    with vllm_serve(folder, tmp_path / "serve.log") as (url, name):
        res = post_json(
            f"{url}/v1/chat/completions", image_chat_body(name, png, req["question"], MAX_TOKENS)
        )
    image_id = json.loads((folder / "config.json").read_text())["image_token_index"]
    assert res["prompt_token_ids"].count(image_id) == keep_count(16, RATIO)
    assert res["choices"][0]["token_ids"] == want

    off = ("--hf-overrides", json.dumps({"bivlm_pruning": {"ratio": 0}}))
    with vllm_serve(folder, tmp_path / "serve_off.log", extra_args=off) as (url, name):
        res = post_json(
            f"{url}/v1/chat/completions", image_chat_body(name, png, req["question"], MAX_TOKENS)
        )
    assert res["prompt_token_ids"].count(image_id) == 16


@pytest.mark.integration
@pytest.mark.parametrize(
    "entry, message",
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.5, "score": "text_attention"}, "is not served"),
        ({"ratio": 0.5, "merge": "yes"}, "merge must be true or false, got 'yes'"),
    ],
)
def test_bad_settings_fail_at_load(request_and_image, entry, message, tmp_path) -> None:
    folder, req = request_and_image
    _set_pruning(folder, entry)
    try:
        proc, _ = _offline(folder, req, tmp_path)
    finally:
        _set_pruning(folder, None)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
