"""`bivlm quantize --prune-ratio`: the checkpoint carries the pruning vLLM applies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0")

from bivlm_plugin.cli import main  # noqa: E402
from tiny_vlms import save_llava_with_processor, save_qwen2_vl_with_processor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "bivlm_vlm_w1.yaml")


def test_prune_ratio_is_written_to_the_config(tmp_path: Path) -> None:
    src, out = tmp_path / "dense", tmp_path / "packed"
    save_llava_with_processor(src)
    argv = ["quantize", "--model", str(src), "--recipe", RECIPE, "--output", str(out)]
    argv += ["--num-calibration-samples", "2", "--prune-ratio", "0.75"]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["bivlm_pruning"] == {"ratio": 0.75, "score": "feature_norm"}
    assert json.loads((out / "bivlm_report.json").read_text())["bivlm_pruning"]["ratio"] == 0.75
    # --prune-merge is carried too, and what `bivlm serve` overrides it with reaches vLLM.
    from bivlm_plugin.app.quantize import _pruning_entry
    from bivlm_plugin.app.serve import server_command

    assert _pruning_entry(0.75, "feature_norm", merge=True)["merge"] is True
    cmd = server_command(out, 8000, prune_ratio=0.9, prune_merge=True)
    entry = json.loads(cmd[cmd.index("--hf-overrides") + 1])["bivlm_pruning"]
    assert entry == {"ratio": 0.9, "score": "feature_norm", "merge": True}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prune-ratio", "1.0"], r"prune ratio must be in \[0, 1\), got 1.0"),
        (["--prune-ratio", "0.5", "--prune-score", "text_attention"], "cannot be served"),
        (["--prune-merge"], "--prune-merge needs --prune-ratio > 0"),
    ],
)
def test_bad_prune_flags_fail_before_calibration(tmp_path: Path, capsys, flags, message) -> None:
    src = tmp_path / "dense"
    save_llava_with_processor(src)
    argv = ["quantize", "--model", str(src), "--recipe", RECIPE, "--output", str(tmp_path / "o")]
    assert main(argv + flags) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_prune_ratio_on_an_unserved_family_fails(tmp_path: Path, capsys) -> None:
    from transformers import LlamaConfig

    src = tmp_path / "llama"  # the family check reads config.json only, before calibration
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(src)
    argv = ["quantize", "--model", str(src), "--recipe", RECIPE, "--output", str(tmp_path / "o")]
    assert main(argv + ["--prune-ratio", "0.5"]) == 2
    assert "served for ['llava', 'qwen2_vl', 'qwen2_5_vl'], not model_type 'llama'" in (
        capsys.readouterr().err
    )


def test_a_score_the_family_cannot_serve_fails_before_calibration(tmp_path: Path, capsys) -> None:
    """Qwen2-VL's tower has no CLS token: vLLM would refuse cls_attention at load."""
    src = tmp_path / "dense"
    save_qwen2_vl_with_processor(src)
    argv = ["quantize", "--model", str(src), "--recipe", RECIPE, "--output", str(tmp_path / "o")]
    argv += ["--prune-ratio", "0.5", "--prune-score", "cls_attention"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'cls_attention' cannot be served for qwen2_vl" in err and "mean_attention" in err
    assert not (tmp_path / "o").exists()
