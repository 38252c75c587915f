"""Visual-token pruning in vLLM for Qwen2-VL and Qwen2.5-VL (opt-in, ``-m integration``): tiny
random checkpoints whose config carries ``bivlm_pruning``; vLLM's offline engine gives, for a
one-image prompt and a two-image prompt of different grids, exactly the greedy tokens that
transformers gives with the same pruning (``generate_with_pruning``, kept tokens at their
original M-RoPE positions), and their log-probabilities to float32 rounding; each image holds
exactly ``keep_count`` placeholders; a repeat of the two-image prompt whose images are both in
the prefix cache gives the same. Bad settings fail at load naming what works.
"""

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
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

from bivlm_plugin.pruning.scores import keep_count  # noqa: E402
from tiny_vlms import (  # noqa: E402
    IMAGE_TOKEN,
    QWEN_CHAT_TEMPLATE,
    TEXT,
    VLLM_QWEN_TEXT,
    VLLM_QWEN_VISION,
    _vqa_tokenizer,
    save_qwen2_vl_with_processor,
)

RUNNER = Path(__file__).with_name("vllm_pruning_runner.py")
MAX_TOKENS = 8
RATIO = 0.75
# float32 vLLM vs transformers, measured 4.8e-7 in every case; misplacing the kept tokens (the
# first k grid positions) moved them 2e-3, a flipped kept token 1e-3.
LOGPROB_ATOL = 1e-5
# Seeded noise images (flat easy-VQA pictures give scores tied to the last bit, and then float
# noise, not the score, picks the kept set): 64x64 (16x16 patches of 4 px, 2x2 merge: 8x8 = 64
# tokens, 16 kept) and 40 wide x 48 high (12x10 patches: 6x5 = 30 tokens, 8 kept).
SIZES = {"a": (64, 64), "b": (40, 48)}
# Lowest kept minus highest dropped score, over the top score, in transformers: above this the
# kept set is decided by the scores, not by float32 rounding (which differs between the two).
MIN_MARGIN = 1e-4
QKV_SCALE = 8.0  # random init attends almost uniformly: mean_attention margins of ~1e-5
N_TOKENS = {"a": 64, "b": 30}
VISION_START, VISION_END = IMAGE_TOKEN + 2, IMAGE_TOKEN + 3
# Short rotary wavelengths, so misplaced image tokens move the log-probabilities visibly (with
# the default rope_theta 1e6, giving the kept tokens the first k grid positions moved them 1e-4).
QWEN_TEXT = {**VLLM_QWEN_TEXT, "rope_theta": 100.0}


def _save_qwen2_5_vl_with_processor(path: Path) -> None:
    """A tiny Qwen2.5-VL (windowed block 0, full-attention block 1; windows of 2x2 merged
    tokens) with the same processor setup as ``save_qwen2_vl_with_processor``."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    fast = _vqa_tokenizer(
        {t: IMAGE_TOKEN + i for i, t in enumerate(specials)},
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.add_special_tokens({"additional_special_tokens": specials})
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=4096
        ),
        tokenizer=fast,
        video_processor=Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    text = {**TEXT, **QWEN_TEXT}
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
            "out_hidden_size": text["hidden_size"],
            "in_channels": 3,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=IMAGE_TOKEN + 1,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)


def _sharpen_vision_attention(folder: Path, scale: float) -> None:
    """Scale the vision tower's qkv projections so its attention is far from uniform."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    hit = [k for k in tensors if "visual." in k and ".attn.qkv." in k]
    assert hit, sorted(tensors)[:5]
    save_file({k: v * scale if k in hit else v for k, v in tensors.items()}, path, {"format": "pt"})


BUILDERS = {
    "qwen2_vl": lambda p: save_qwen2_vl_with_processor(p, QWEN_TEXT, VLLM_QWEN_VISION),
    "qwen2_5_vl": _save_qwen2_5_vl_with_processor,
}


def _set_pruning(folder: Path, entry: dict | None) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("bivlm_pruning", None)
    if entry is not None:
        cfg["bivlm_pruning"] = entry
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


# CI's default run keeps Qwen2-VL; Qwen2.5-VL (same hook, windowed tower) and the ratio-0 check
# are opt-in (`-m slow`) to keep the default run within its budget.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(f, marks=pytest.mark.slow) if f != "qwen2_vl" else f for f in sorted(BUILDERS)
    ],
)
def setup(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The family's tiny checkpoint and two requests: image a + question 0; images b, a +
    question 1."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from bivlm_plugin.eval.vqa_data import easy_vqa_items

    root = tmp_path_factory.mktemp(f"{request.param}_prune")
    folder = root / "dense"
    BUILDERS[request.param](folder)
    _sharpen_vision_attention(folder, QKV_SCALE)
    items = easy_vqa_items("test", 2)
    gen = np.random.default_rng(0)
    paths = {}
    for name, (w, h) in SIZES.items():
        paths[name] = root / f"{name}.png"
        Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    processor = AutoProcessor.from_pretrained(folder)

    def req(names: list[str], question: str) -> dict:
        content = [{"type": "image"} for _ in names] + [{"type": "text", "text": question}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return {"prompt": prompt, "images": [str(paths[n]) for n in names], "names": names}

    return folder, [req(["a"], items[0].question), req(["b", "a"], items[1].question)]


def _transformers_pruned(
    folder: Path, req: dict, score: str, merge: bool = False
) -> tuple[list[int], list[float]]:
    """Greedy ids and their log-probabilities from transformers' pruning."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vllm_serve_helpers import pruned_greedy

    processor = AutoProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in req["images"]]
    enc = processor(text=req["prompt"], images=images, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    margins = _score_margins(model, enc, score)
    assert min(margins) > MIN_MARGIN, f"near-tied scores at the keep boundary: {margins}"
    return pruned_greedy(model, enc, RATIO, score, merge, MAX_TOKENS)


@torch.inference_mode()
def _score_margins(model, enc, score: str) -> list[float]:
    """Per image: (lowest kept score - highest dropped one) / top score, in transformers."""
    from bivlm_plugin.integrations.transformers.pruning import _qwen_image_features, _qwen_scores

    grid = enc["image_grid_thw"]
    need = score == "mean_attention"
    feats, attn = _qwen_image_features(model, enc["pixel_values"], grid, need)
    margins = []
    for s in _qwen_scores(model, enc, score, feats, attn, None):
        top = s.float().sort(descending=True).values
        k = keep_count(s.numel(), RATIO)
        margins.append(((top[k - 1] - top[k]) / top[0]).item())
    return margins


def _offline(folder: Path, rounds: list[list[dict]], tmp_path: Path):
    req_path, out_path = tmp_path / "req.json", tmp_path / "out.json"
    req_path.write_text(json.dumps({"rounds": rounds}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(RUNNER), str(folder), str(req_path), str(out_path), str(MAX_TOKENS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out_path.read_text())["rounds"] if proc.returncode == 0 else None)


def _image_runs(ids: list[int]) -> list[int]:
    """Placeholder count of each image: the image tokens between <|vision_start|> and
    <|vision_end|>, in prompt order."""
    runs, inside = [], None
    for t in ids:
        if t == VISION_START:
            inside = 0
        elif t == VISION_END:
            runs.append(inside)
            inside = None
        elif inside is not None:
            assert t == IMAGE_TOKEN, f"token {t} inside an image span"
            inside += 1
    return runs


@pytest.mark.integration
# mean_attention is opt-in (-m slow) for CI's time budget: feature_norm covers the Qwen path;
# LLaVA's tests run the attention scores.
@pytest.mark.parametrize(
    "score, merge",
    [
        ("feature_norm", False),
        ("feature_norm", True),
        pytest.param("mean_attention", False, marks=pytest.mark.slow),
    ],
)
def test_offline_pruned_tokens_equal_transformers(setup, score, merge, tmp_path) -> None:
    folder, requests = setup
    _set_pruning(folder, {"ratio": RATIO, "score": score, "merge": merge})
    want = [_transformers_pruned(folder, r, score, merge) for r in requests]
    proc, rounds = _offline(folder, [requests, [requests[1]]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    (first, second), (repeat,) = rounds
    for req, got, (tokens, logprobs) in zip(requests, (first, second), want, strict=True):
        runs = _image_runs(got["prompt_token_ids"])
        assert runs == [keep_count(N_TOKENS[n], RATIO) for n in req["names"]]
        assert got["tokens"] == tokens, f"vLLM {got['tokens']} vs transformers {tokens}"
        torch.testing.assert_close(got["logprobs"], logprobs, atol=LOGPROB_ATOL, rtol=0)
        if merge:  # vLLM merged: its log-probabilities are not those of dropping the tokens
            _, drop_lp = _transformers_pruned(folder, req, score)
            gap = max(abs(x - y) for x, y in zip(got["logprobs"], drop_lp, strict=True))
            assert gap > 10 * LOGPROB_ATOL, f"merged and dropped log-probs within {gap}"
    # The repeat's images both lie in its prefix-cache hit (vLLM strips their pixels).
    last_image = max(i for i, t in enumerate(repeat["prompt_token_ids"]) if t == IMAGE_TOKEN)
    assert repeat["num_cached_tokens"] > last_image, repeat
    assert repeat["tokens"] == want[1][0]
    torch.testing.assert_close(repeat["logprobs"], want[1][1], atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.integration
@pytest.mark.slow
def test_ratio_zero_is_unpruned(setup, tmp_path) -> None:
    """``{"ratio": 0}``: the registered class is vLLM's own, N placeholders per image, the
    tokens of transformers' plain generate."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, requests = setup
    req = requests[1]
    _set_pruning(folder, {"ratio": 0})
    processor = AutoProcessor.from_pretrained(folder)
    images = [Image.open(p).convert("RGB") for p in req["images"]]
    enc = processor(text=req["prompt"], images=images, return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
    want = out[0, enc["input_ids"].shape[1] :].tolist()
    proc, rounds = _offline(folder, [[req]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    ((got,),) = rounds
    assert _image_runs(got["prompt_token_ids"]) == [N_TOKENS[n] for n in req["names"]]
    assert got["tokens"] == want


@pytest.mark.integration
@pytest.mark.parametrize(
    "entry, message",
    [
        ({"ratio": 0.5, "score": "cls_attention"}, r"no CLS token\); use one of \('feature_norm'"),
    ],
)
def test_bad_settings_fail_at_load(setup, entry, message, tmp_path) -> None:
    folder, requests = setup
    _set_pruning(folder, entry)
    try:
        proc, _ = _offline(folder, [requests[:1]], tmp_path)
    finally:
        _set_pruning(folder, None)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-3000:]
