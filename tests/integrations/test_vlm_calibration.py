"""VLM calibration set of ``bivlm quantize``: easy-VQA train triples, optionally followed by
plain WikiText text (P1 calibration windows) for the language model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("easy_vqa", reason="needs easy-vqa==1.0 (scripts/setup.sh installs it)")

from tiny_vlms import save_llava_with_processor  # noqa: E402


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    path: Path = tmp_path_factory.mktemp("llava_calib")
    save_llava_with_processor(path)
    return AutoProcessor.from_pretrained(path)


def test_text_tokens_follow_each_triple(processor) -> None:
    from bivlm_plugin.app.quantize import collate_one, easy_vqa_calibration
    from bivlm_plugin.eval.data import p1_windows

    plain, longest = easy_vqa_calibration(processor, 3)
    mixed, longest_mixed = easy_vqa_calibration(processor, 3, text_tokens=16)
    windows = p1_windows(processor.tokenizer, "calib")
    assert longest_mixed == longest + 16
    for i in range(3):
        a, b = collate_one([plain[i]]), collate_one([mixed[i]])
        n = a["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == n + 16
        assert torch.equal(b["input_ids"][0, :n], a["input_ids"][0])  # the triple, unchanged
        assert torch.equal(b["input_ids"][0, n:], windows[i, :16])  # then window i
        assert b["attention_mask"].shape == b["input_ids"].shape and bool(b["attention_mask"].all())
        assert torch.equal(b["pixel_values"], a["pixel_values"])  # every sample keeps its image


@pytest.mark.parametrize("tokens", [-1, 513])
def test_text_token_count_is_checked(processor, tokens: int) -> None:
    from bivlm_plugin.app.quantize import easy_vqa_calibration

    with pytest.raises(ValueError, match=f"must be in 1..512.*got {tokens}"):
        easy_vqa_calibration(processor, 2, text_tokens=tokens)
