"""BiVLMModifier on tiny VLMs of each supported family, in both settings of the paper."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401
from tiny_vlms import FAMILIES, collate, dataset  # noqa: E402

RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      scope: {scope}
      p_sal: 0.02
      p_sal_vision: 0.05
      refine_iters: 1
      ignore: [lm_head]
"""


def _run(family: str, scope: str, tmp_path):
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    torch.manual_seed(0)
    FAMILIES[family].model().save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    oneshot(
        model=model,
        processor=tok,
        recipe=RECIPE.format(scope=scope),
        dataset=dataset(family, 4),
        data_collator=collate,
        num_calibration_samples=4,
        max_seq_length=64,
    )
    mod = next(
        m
        for m in active_session().lifecycle.recipe.modifiers
        if type(m).__name__ == "BiVLMModifier"
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return model, mod, changed


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("scope", ["language", "all"])
def test_vlm_settings(family: str, scope: str, tmp_path) -> None:
    fam = FAMILIES[family]
    model, mod, changed = _run(family, scope, tmp_path)
    records = mod.records
    parts = {r.part for r in records}
    assert parts == ({"language"} if scope == "language" else {"language", "vision"})
    for r in records:
        assert r.name.startswith(fam.vision_prefix) == (r.part == "vision"), r.name
        assert r.info["p_sal"] == (0.05 if r.part == "vision" else 0.02), r.name
    quantized = {r.name + ".weight" for r in records}
    assert changed == quantized  # nothing else moved: projector, embeddings, norms, lm_head
    assert not any(n.startswith(fam.projector_prefix) for n in quantized)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in quantized)
    n_lang = sum(r.part == "language" for r in records)
    assert n_lang == 7 * 2  # q k v o gate up down in both decoder layers
    for p in model.parameters():
        assert torch.isfinite(p).all()
