"""`bivlm analyze pruning` on a tiny random LLaVA: table, JSON and a PNG that opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0")

from tiny_vlms import save_llava_with_processor  # noqa: E402


def test_analyze_pruning_writes_table_json_and_plot(tmp_path: Path, capsys, monkeypatch) -> None:
    from PIL import Image

    from bivlm_plugin.cli import main
    from bivlm_plugin.integrations.transformers import pruning

    seen = set()
    real = pruning.generate_with_pruning

    def spy(model, inputs, prune_ratio, prune_score="cls_attention", merge=False, **kw):
        seen.add((prune_score, merge))
        return real(model, inputs, prune_ratio, prune_score, merge, **kw)

    monkeypatch.setattr(pruning, "generate_with_pruning", spy)

    src = tmp_path / "llava"
    save_llava_with_processor(src)
    out = tmp_path / "study"
    argv = [
        "analyze",
        "pruning",
        "--model",
        f"tiny={src}",
        "--scores",
        "feature_norm,cls_attention,feature_norm+merge",
    ]
    argv += ["--ratios", "0,0.5,0.9", "--limit", "4", "--out-dir", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "prune_study.json").read_text())
    rows = res["rows"]
    assert len(rows) == 9
    assert {r["score"] for r in rows} == {"feature_norm", "cls_attention", "feature_norm+merge"}
    assert seen == {("feature_norm", False), ("cls_attention", False), ("feature_norm", True)}
    base = [r["accuracy"] for r in rows if r["ratio"] == 0.0]
    assert base[0] == base[1] == base[2]  # r = 0 is one measurement per model
    assert res["protocol"] == "P2, first 4 questions"
    assert "| tiny | feature_norm |" in (out / "prune_study.md").read_text()
    assert "| tiny | feature_norm+merge |" in (out / "prune_study.md").read_text()
    with Image.open(out / "prune_study.png") as im:
        assert im.size[0] > 300


def test_analyze_pruning_rejects_bad_ratio(tmp_path: Path, capsys) -> None:
    from bivlm_plugin.cli import main

    src = tmp_path / "llava"
    save_llava_with_processor(src)
    argv = ["analyze", "pruning", "--model", str(src), "--ratios", "0,1.0", "--out-dir", "x"]
    assert main(argv) == 2
    assert "prune ratio must be in [0, 1)" in capsys.readouterr().err
    argv = ["analyze", "pruning", "--model", str(src), "--scores", "feature_norm+blend"]
    assert main([*argv, "--out-dir", "x"]) == 2
    assert "unknown score 'feature_norm+blend'" in capsys.readouterr().err
