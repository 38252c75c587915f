"""The main job (``bivlm demo``, README command (a)) end to end on the small reference VLM:
build (cached), quantize, P2 / P1, ``vllm serve`` with pruning answering an image question,
speed ratios against the bf16 model served the same way, the summary table; then the caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")
pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0")
pytest.importorskip("peft", reason="the zoo build needs peft")

REPO = Path(__file__).resolve().parents[1]


# Opt-in for CI's time budget: 253 s with the small VLM already built (it quantizes, evaluates,
# serves twice); passed on an AVX2-only machine, 2026-12-02 (bash scripts/test.sh -m slow
# integration_tests/test_main_job.py).
@pytest.mark.slow
def test_main_job_answers_an_image_question_and_caches(tmp_path: Path, capsys) -> None:
    from bivlm_plugin.app import main_job
    from bivlm_plugin.cli import main

    work = tmp_path / "work"
    argv = ["demo", "--recipe", str(REPO / "recipes" / "bivlm_vlm_w1.yaml"), "--p2-limit", "8"]
    argv += ["--work", str(work), "--json", str(tmp_path / "summary.json")]
    argv += ["--zoo", "easyvqa-vlm-tiny"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert f"question: {summary['question']}" in out
    assert f"served:   {summary['served_answer']!r}" in out
    assert f"right:    {summary['right_answer']!r}" in out
    assert summary["served_answer"].strip()
    assert summary["storage_bits_from_files"] < 2.0
    assert summary["disk_bytes"]["packed"] < summary["disk_bytes"]["bf16"]
    assert summary["p2_questions"] == 8 and 0 <= summary["p2"]["packed"] <= 1
    assert summary["ttft_ratio_vs_bf16"] > 0 and summary["decode_ratio_vs_bf16"] > 0
    assert "P2 accuracy (8 questions)" in out and "vLLM decode (tokens/s)" in out
    # a second run finds every expensive step cached
    cfg = main_job.MainJobConfig(
        recipe=REPO / "recipes" / "bivlm_vlm_w1.yaml", p2_limit=8, zoo="easyvqa-vlm-tiny"
    )
    packed, cached = main_job._quantized(cfg, Path(summary["source"]), work)
    assert cached and str(packed) == summary["packed"]
    assert main_job._evaluated(cfg, packed, work)[1]


def test_main_job_rejects_a_bad_ratio_before_any_work(tmp_path: Path, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["demo", "--prune-ratio", "1.5", "--work", str(tmp_path)]) == 2
    assert "prune ratio must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_main_job_rejects_a_missing_recipe_before_any_work(tmp_path: Path, capsys) -> None:
    from bivlm_plugin.cli import main

    argv = ["demo", "--recipe", str(tmp_path / "nope.yaml"), "--work", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nope.yaml is neither a file nor a shipped recipe" in err and "bivlm_vlm_w2" in err
    assert not (tmp_path / "w").exists()
