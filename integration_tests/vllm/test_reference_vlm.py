"""The reference-VLM path as a user runs it (opt-in, ``-m integration``), on the small variant
``easyvqa-vlm-tiny`` (the real build's code with the first 4 SmolLM2 decoder layers and fewer
steps; built once into ``$BIVLM_HOME``, about 3 minutes here):

``bivlm quantize --recipe recipes/bivlm_vlm_w2.yaml`` and the Python ``oneshot`` equivalent
calibrate on easy-VQA train triples; the packed output loads with ``from_pretrained`` (weights
stay packed) and answers P2 questions; ``vllm serve`` answers an image chat request with the
tokens transformers gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")
pytest.importorskip("peft", reason="the zoo build needs peft (scripts/setup.sh installs it)")

import bivlm_plugin  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "bivlm_vlm_w2.yaml"
N_QUESTIONS = 48
MAX_TOKENS = 6
# Floors measured on this build (seed 0, 48 questions, 2026-12-02), kept below the measured
# values: FP passed 0.6 when built under bf16 autocast (AVX512-BF16 machine) and measured 0.583
# (28/48) when built in float32 (an AVX2-only machine: the build follows utils.fast_bf16);
# bivlm_vlm_w2 packed measured 0.54 (26/48) on the bf16-built model and 0.417 (20/48) on the
# float32-built one: the 4-layer model binarized with 16 calibration samples keeps some yes/no
# answers and loses shapes, near chance (about 0.4: yes/no is a third of the questions, 6
# colours, 3 shapes). So the packed floor only catches a broken pipeline (garbage or empty
# answers score about 0); tokens equal to transformers' are checked through vLLM below, and the
# real reference VLM's figures are in docs/RESULTS.md.
FP_FLOOR = 0.5
PACKED_FLOOR = 0.3


@pytest.fixture(scope="module")
def tiny_ref() -> Path:
    from bivlm_plugin import zoo

    return zoo.build("easyvqa-vlm-tiny")


@pytest.fixture(scope="module")
def packed(tiny_ref: Path, tmp_path_factory) -> Path:
    from bivlm_plugin.cli import main

    out = tmp_path_factory.mktemp("ref_vlm") / "packed"
    argv = ["quantize", "--model", str(tiny_ref), "--recipe", str(RECIPE), "--output", str(out)]
    assert main(argv + ["--num-calibration-samples", "16"]) == 0
    return out


@pytest.mark.integration
def test_zoo_build_is_cached_and_prints_the_folder(tiny_ref: Path, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["zoo", "build", "easyvqa-vlm-tiny"]) == 0  # a second call reuses the build
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tiny_ref)
    info = json.loads((tiny_ref / "bivlm_zoo.json").read_text())
    assert info["n_image_tokens"] == 64 and info["recipe"]["lm_layers"] == 4


@pytest.mark.integration
def test_cli_quantize_whole_vlm_w2(packed: Path) -> None:
    report = json.loads((packed / "bivlm_report.json").read_text())
    assert report["calibration"]["samples"] == 16
    parts = {lay["part"] for lay in report["layers"]}
    assert parts == {"language", "vision"}
    assert not any("multi_modal_projector" in lay["name"] for lay in report["layers"])
    # The recipe's promise (<= 2.3 bits from the files) is for the reference VLM, whose vision
    # tower is ~1.5% of its quantized weights; the 4-layer variant's is ~11%, at 5% salient.
    lang = [lay for lay in report["layers"] if lay["part"] == "language"]
    n = sum(lay["shape"][0] * lay["shape"][1] for lay in lang)
    lang_bits = sum(
        lay["storage_bits_from_files"] * lay["shape"][0] * lay["shape"][1] for lay in lang
    )
    assert lang_bits / n <= 2.3
    assert report["storage_bits_from_files"] <= 2.5


@pytest.mark.integration
def test_p2_fp_and_packed(tiny_ref: Path, packed: Path) -> None:
    from bivlm_plugin.eval.vqa import evaluate_vqa, load_vlm, p2_items
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    items = p2_items(N_QUESTIONS)
    model, processor = load_vlm(tiny_ref)
    fp = evaluate_vqa(model, processor, items)
    model, processor = load_vlm(packed)
    n_packed = sum(isinstance(m, BinaryLinear) for m in model.modules())
    assert n_packed == 4 * 7 + 4 * 6  # LM: q k v o gate up down; CLIP: q k v out fc1 fc2
    got = evaluate_vqa(model, processor, items)
    assert fp.accuracy >= FP_FLOOR, fp
    assert got.accuracy >= PACKED_FLOOR, got


@pytest.mark.integration
def test_python_oneshot_path(tiny_ref: Path, tmp_path: Path) -> None:
    """The README's Python example, read out of README.md and run with its placeholders filled
    (the small variant, 4 calibration samples, OUT a folder here): oneshot with the recipe and
    easy-VQA calibration, save; then load packed with from_pretrained, answer."""
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear
    from test_readme_examples import readme_block, run_readme_code

    out = tmp_path / "packed"
    code = readme_block('src = zoo.build("easyvqa-vlm")')
    for old, new in (
        ('zoo.build("easyvqa-vlm")', 'zoo.build("easyvqa-vlm-tiny")'),
        ("easy_vqa_calibration(processor, 128)", "easy_vqa_calibration(processor, 4)"),
        ("num_calibration_samples=128", "num_calibration_samples=4"),
        ('"OUT"', repr(str(out))),
    ):
        assert old in code, f"the README example no longer has {old!r}"
        code = code.replace(old, new)
    ns = run_readme_code(code, {})
    assert Path(ns["src"]) == tiny_ref

    from bivlm_plugin.eval.vqa import evaluate_vqa, load_vlm, p2_items

    loaded, processor = load_vlm(out)
    assert any(isinstance(m, BinaryLinear) for m in loaded.modules())
    res = evaluate_vqa(loaded, processor, p2_items(8))
    assert all(p.strip() for p in res.predictions)


def _request(folder: Path, tmp_path: Path) -> dict:
    """The first P2 question as a chat prompt, its image saved as PNG."""
    from transformers import AutoProcessor

    from bivlm_plugin.eval.vqa_data import easy_vqa_items

    item = easy_vqa_items("test", 1)[0]
    png_path = tmp_path / "q0.png"
    item.image().save(png_path)
    processor = AutoProcessor.from_pretrained(folder)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    return {"prompt": prompt, "image": str(png_path), "question": item.question}


def _transformers_greedy(folder: Path, req: dict) -> tuple[list[int], list[int]]:
    """(prompt ids after image expansion, MAX_TOKENS greedy ids), float32 like the vLLM runs."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    image = Image.open(req["image"]).convert("RGB")
    enc = processor(text=req["prompt"], images=[image], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: exactly MAX_TOKENS
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False)
    return enc["input_ids"][0].tolist(), ids[0, enc["input_ids"].shape[1] :].tolist()


def _vllm_offline(folder: Path, req: dict, tmp_path: Path) -> dict:
    from vllm_serve_helpers import run_vlm_runner

    proc, result = run_vlm_runner(folder, req, tmp_path, MAX_TOKENS)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return result


def _served_chat(folder: Path, req: dict, tmp_path: Path) -> dict:
    from vllm_serve_helpers import image_chat_body, post_json, vllm_serve

    with vllm_serve(folder, tmp_path / "serve.log") as (url, name):
        body = image_chat_body(name, Path(req["image"]).read_bytes(), req["question"], MAX_TOKENS)
        return post_json(f"{url}/v1/chat/completions", body)


def _check_vllm(folder: Path, tmp_path: Path, quantization: str | None) -> None:
    req = _request(folder, tmp_path)
    prompt_ids, want = _transformers_greedy(folder, req)
    offline = _vllm_offline(folder, req, tmp_path)
    assert offline["quantization"] == quantization
    assert offline["tokens"] == want, f"vLLM {offline['tokens']} vs transformers {want}"
    res = _served_chat(folder, req, tmp_path)
    assert res["prompt_token_ids"] == prompt_ids  # same chat rendering and image expansion
    assert res["choices"][0]["token_ids"] == want
    assert res["choices"][0]["message"]["content"].strip()


@pytest.mark.integration
@pytest.mark.slow  # about 2 min; the tiny random LLaVA tests run the same paths in CI's budget
def test_packed_small_variant_in_vllm_offline_and_served(packed: Path, tmp_path: Path) -> None:
    """Offline ``LLM`` and ``vllm serve`` (an image chat request) give transformers' tokens."""
    _check_vllm(packed, tmp_path, "bivlm")


@pytest.mark.slow
def test_reference_vlm_in_vllm_offline_and_served(tmp_path: Path) -> None:
    """The real reference VLM (dense) loads in transformers and serves in vLLM."""
    from bivlm_plugin import zoo

    _check_vllm(zoo.build("easyvqa-vlm"), tmp_path, None)
