"""The GPTQ peer on a whole VLM: ``VisionTowerGPTQModifier`` (llm-compressor's GPTQ, with the
vision tower's weights observed) quantizes LLaVA's vision tower and language model; the packed
save reports bits from its files and the dense (``--fake-quant``) save loads and answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0")

from bivlm_plugin.cli import main  # noqa: E402
from tiny_vlms import save_llava_with_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("gptq_vlm")
    save_llava_with_processor(root / "dense")
    recipe = yaml.safe_load((REPO / "recipes" / "gptq_w2a16_g64_asym_vlm.yaml").read_text())
    args = recipe["quant_stage"]["quant_modifiers"]["VisionTowerGPTQModifier"]
    args["config_groups"]["group_0"]["weights"]["group_size"] = 16  # the tiny model is 32 wide
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _quantize(root: Path, out: str, *flags: str) -> dict:
    argv = ["quantize", "--model", str(root / "dense"), "--recipe", str(root / "recipe.yaml")]
    argv += ["--output", str(root / out), "--num-calibration-samples", "4", *flags]
    assert main(argv) == 0
    return json.loads((root / out / "bivlm_report.json").read_text())


def test_whole_vlm_gptq_quantizes_the_vision_tower(setup: Path) -> None:
    report = _quantize(setup, "packed")
    names = [layer["name"] for layer in report["layers"]]
    assert any("vision_tower" in n for n in names)
    assert any("language_model" in n for n in names)
    assert not any("multi_modal_projector" in n for n in names)
    # 2 bits + fp16 scale and 2-bit zero point per 16: 3.125, plus padding of the packed zeros
    assert 3.125 <= report["storage_bits_from_files"] < 3.3
    assert report["packed_layers"] == len(names)


def test_whole_vlm_gptq_dense_save_loads_and_answers(setup: Path, capsys) -> None:
    _quantize(setup, "dense_q", "--fake-quant")
    argv = ["eval", "vqa", "--model", str(setup / "dense_q"), "--limit", "2", "--dtype", "float32"]
    assert main(argv) == 0
    assert "P2 accuracy" in capsys.readouterr().out
