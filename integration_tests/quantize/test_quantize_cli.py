"""`bivlm quantize` end to end on a tiny LLaMA: report, atomic output, overrides, P1 eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _quantize(model_dir, out, data, *extra):
    from bivlm_plugin.cli import main

    return main(
        [
            "quantize",
            "--model",
            str(model_dir),
            "--recipe",
            str(RECIPES / "bivlm_lm_w1.yaml"),
            "--output",
            str(out),
            "--data",
            str(data),
            "--num-calibration-samples",
            "2",
            *extra,
        ]
    )


def test_quantize_writes_report_and_evaluates(
    tiny_llama_dir, wikitext_dir, tmp_path, capsys
) -> None:
    from bivlm_plugin.cli import main

    out = tmp_path / "q"
    assert _quantize(tiny_llama_dir, out, wikitext_dir, "--set", "refine_iters=0") == 0
    report = json.loads((out / "bivlm_report.json").read_text())
    for key in ("method", "weight_bits", "storage_bits", "seconds", "layers", "format", "note"):
        assert key in report
    assert report["method"] == "bivlm" and report["format"] == "bivlm-binary"  # packed
    # Bits counted from the safetensors files vs the quantizer's own count: the files add byte
    # padding (the second salient plane is stored as whole bytes per row: 8 bits for k=1 where
    # count_bits charges 1) and drop the 16 bits count_bits charges for k (a tensor shape in the
    # files). On these 64/96-wide layers that is +0.0897 bits per weight, measured.
    diff = report["storage_bits_from_files"] - report["storage_bits"]
    assert 0.0 <= diff <= 7 / 64 + 1e-9
    assert report["n_layers"] == 14 and len(report["layers"]) == 14
    assert 1.0 < report["weight_bits"] < 1.1 and report["storage_bits"] > report["weight_bits"]
    assert report["calibration"] == {"protocol": "P1", "windows": 2, "seqlen": 512}
    mod_args = report["recipe"]["quant_stage"]["quant_modifiers"]["BiVLMModifier"]
    assert mod_args["refine_iters"] == 0  # --set reached the modifier
    assert not list(tmp_path.glob(".q.*"))  # no temporary folder left behind

    ppl_json = tmp_path / "ppl.json"
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(out),
                "--data",
                str(wikitext_dir),
                "--json",
                str(ppl_json),
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    res = json.loads(ppl_json.read_text())
    assert res["quantization"]["method"] == "bivlm" and res["n_tokens"] == 32704

    # bivlm report on what the two commands wrote: every layer with its bits and errors, and
    # the P1-vs-bits plot with this model's point.
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert main(["report", str(out), str(ppl_json), "--out-dir", str(rep)]) == 0
    printed = capsys.readouterr().out
    for layer in report["layers"]:
        assert f"| {layer['name']} |" in printed
    assert f"{report['storage_bits_from_files']:.3f} in the files" in printed
    assert (rep / "p1_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (rep / "p2_vs_bits.png").exists()  # no P2 evaluation given
    assert f"{res['ppl']:,.2f}" in (rep / "report.md").read_text()


def test_quantize_on_the_second_calibration_set(tiny_llama_dir, wikitext_dir, tmp_path) -> None:
    out = tmp_path / "q2"
    assert (
        _quantize(
            tiny_llama_dir,
            out,
            wikitext_dir,
            "--calibration-offset",
            "128",
            "--set",
            "refine_iters=0",
        )
        == 0
    )
    report = json.loads((out / "bivlm_report.json").read_text())
    assert report["calibration"] == {
        "protocol": "P1",
        "windows": 2,
        "seqlen": 512,
        "first_window": 128,
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantize_calibration_dtype_is_forced(
    tiny_llama_dir, wikitext_dir, tmp_path, dtype
) -> None:
    out = tmp_path / dtype
    extra = ("--calibration-dtype", dtype, "--set", "refine_iters=0")
    assert _quantize(tiny_llama_dir, out, wikitext_dir, *extra) == 0
    report = json.loads((out / "bivlm_report.json").read_text())
    assert report["calibration_dtype"] == dtype


def test_calibration_dtype_rejects_other_values() -> None:
    from bivlm_plugin.app.quantize import calibration_torch_dtype

    assert calibration_torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="'float16'.*auto"):
        calibration_torch_dtype("float16")


def test_quantize_refuses_to_overwrite(tiny_llama_dir, wikitext_dir, tmp_path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    assert _quantize(tiny_llama_dir, out, wikitext_dir) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_quantize_bad_override_names_field(tiny_llama_dir, wikitext_dir, tmp_path, capsys) -> None:
    assert _quantize(tiny_llama_dir, tmp_path / "x", wikitext_dir, "--set", "n_ringz=2") == 2
    assert "n_ringz" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_quantize_vlm_calibrates_on_easy_vqa(tmp_path) -> None:
    pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bivlm_plugin.cli import main
    from tiny_vlms import save_llava_with_processor

    src, out = tmp_path / "llava", tmp_path / "q"
    save_llava_with_processor(src)
    assert (
        main(
            [
                "quantize",
                "--model",
                str(src),
                "--recipe",
                str(RECIPES / "bivlm_vlm_w1.yaml"),
                "--output",
                str(out),
                "--num-calibration-samples",
                "3",
            ]
        )
        == 0
    )
    report = json.loads((out / "bivlm_report.json").read_text())
    assert report["calibration"]["samples"] == 3
    parts = {lay["part"] for lay in report["layers"]}
    assert parts == {"language", "vision"}  # whole-VLM setting of the recipe
    assert not any("multi_modal_projector" in lay["name"] for lay in report["layers"])
    # The saved folder loads back with its processor and runs on an image-question pair.
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    from bivlm_plugin.eval.vqa_data import easy_vqa_items

    item = easy_vqa_items("test", 1)[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = processor(text=text, images=[item.image()], return_tensors="pt")
    assert torch.isfinite(model(**enc).logits).all()
