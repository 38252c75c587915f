"""The ``bivlm_pruning`` config entry vLLM reads: validated with messages that name the fix."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bivlm_plugin.integrations.vllm.pruning import pruning_settings


def _cfg(entry=None, model_type="llava"):
    cfg = SimpleNamespace(model_type=model_type)
    if entry is not None:
        cfg.bivlm_pruning = entry
    return cfg


def test_absent_or_zero_is_off() -> None:
    assert not pruning_settings(_cfg()).enabled
    assert not pruning_settings(_cfg({"ratio": 0})).enabled
    assert not pruning_settings(_cfg({"ratio": 0}, model_type="qwen2_vl")).enabled


def test_valid_entry() -> None:
    s = pruning_settings(_cfg({"ratio": 0.9, "score": "cls_attention"}))
    assert s.enabled and s.ratio == 0.9 and s.score == "cls_attention"
    assert pruning_settings(_cfg({"ratio": 0.5})).score == "feature_norm"
    assert not pruning_settings(_cfg({"ratio": 0.5})).merge
    assert pruning_settings(_cfg({"ratio": 0.5, "merge": True})).merge


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("score", ["feature_norm", "mean_attention"])
def test_qwen_entries(family, score) -> None:
    s = pruning_settings(_cfg({"ratio": 0.75, "score": score}, model_type=family))
    assert s.enabled and s.score == score


@pytest.mark.parametrize(
    "entry, model_type, message",
    [
        ({"ratio": 1.0}, "llava", r"ratio must be in \[0, 1\), got 1.0"),
        ({"ratio": -0.1}, "llava", r"ratio must be in \[0, 1\)"),
        ({"ratio": 0.5, "score": "text_attention"}, "llava", "text-conditioned"),
        ({"ratio": 0.5, "score": "nope"}, "llava", "'nope' is not served"),
        ({"ratio": 0.5, "typo": 1}, "llava", r"unknown keys \['typo'\]"),
        ({"ratio": 0.5}, "idefics3", r"supports \['llava', 'qwen2_vl', 'qwen2_5_vl'\], not "),
        (
            {"ratio": 0.5, "score": "cls_attention"},
            "qwen2_vl",
            r"not served for qwen2_vl \(its vision tower has no CLS token\); use one of "
            r"\('feature_norm', 'mean_attention'\)",
        ),
        (0.5, "llava", "must be a mapping"),
        ({"ratio": 0.5, "merge": 1}, "llava", "merge must be true or false, got 1"),
    ],
)
def test_bad_entries_name_the_problem(entry, model_type, message) -> None:
    with pytest.raises(ValueError, match=message):
        pruning_settings(_cfg(entry, model_type))
