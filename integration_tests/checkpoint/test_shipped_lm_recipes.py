"""The shipped language-model recipes, unchanged, on a small LLaMA: each runs through
llm-compressor's ``oneshot``, saves packed, loads back with the same logits, and keeps its
storage budget as read from the files (the recipes set code_choice / act_order / fold_scales,
which no other test combines)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers with llm-compressor / transformers / c-t)

REPO = Path(__file__).resolve().parents[2]
# Budget each recipe promises in its header (storage bits per weight, every stored tensor).
BUDGETS = {"bivlm_lm_w1.yaml": 1.3, "bivlm_lm_w2.yaml": 2.25, "bivlm_lm_w3.yaml": 3.25}
LOGIT_ATOL = 1e-4  # as test_packed_checkpoint: packed vs fake-quantized, float32


# Opt-in (`-m slow`): 29 s for the three recipes on the idle 2-core machine (2026-12-07, with
# the cheap salient-share search; 288 s for the ~1-bit recipe alone once, a P1 run sharing the
# cores): the fold's cheap pass and the search run on the 1056-wide down_proj.
@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(BUDGETS))
def test_shipped_lm_recipe_packs_loads_and_keeps_its_budget(
    recipe, small_llama_dir, tiny_tokenizer, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import bivlm_modifier, oneshot_on_random_tokens, packed_roundtrip

    model = AutoModelForCausalLM.from_pretrained(small_llama_dir, dtype=torch.float32)
    text = (REPO / "recipes" / recipe).read_text()
    ids = oneshot_on_random_tokens(model, tiny_tokenizer, text, 300, n=8, seqlen=64)
    summary = bivlm_modifier().summary()
    assert len(summary["layers"]) == 7  # q k v o gate up down of the one decoder layer
    if "fold_scales: true" in text:
        assert all("folded_scale" in lay["info"] for lay in summary["layers"])
    diff, from_files = packed_roundtrip(model, ids, tmp_path, summary["layers"])
    assert diff <= LOGIT_ATOL
    assert from_files <= BUDGETS[recipe], (recipe, from_files)
