"""``fold_scales``: column scales folded into the producing norm / linear (zero stored bits)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers the modifier)
from bivlm_plugin.core.binarize import dequantize  # noqa: E402
from bivlm_plugin.integrations.llmcompressor.fold import (  # noqa: E402
    norm_offset,
    resolve_fold_groups,
)

RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      method: bivlm
      fold_scales: true
      targets: [Linear]
      ignore: [lm_head]
      refine_iters: 1
"""


def _llama(kv_heads: int, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1, so a wrong fold shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _gemma3(vocab: int = 96):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,
    )
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(-0.5, 0.5)  # Gemma scales by (1 + w)
    return model.eval()


def _linears(model) -> dict[torch.nn.Module, str]:
    return {
        m: n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }


def test_norm_offset_is_probed() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert norm_offset(LlamaRMSNorm(8)) == 0.0
    assert norm_offset(Gemma3RMSNorm(8)) == 1.0
    assert norm_offset(torch.nn.LayerNorm(8)) == 0.0
    assert norm_offset(torch.nn.Linear(8, 8)) is None
    assert norm_offset(torch.nn.ReLU()) is None


def test_groups_follow_the_awq_mappings_and_skip_what_cannot_fold() -> None:
    mha = _llama(kv_heads=4)
    groups, skipped = resolve_fold_groups(mha, _linears(mha))
    got = {
        (g.producer_name.split(".", 3)[-1], tuple(n.rsplit(".", 1)[-1] for n in g.reader_names))
        for g in groups
        if ".layers.0." in g.producer_name
    }
    assert got == {
        ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
        ("self_attn.v_proj", ("o_proj",)),
        ("post_attention_layernorm", ("gate_proj", "up_proj")),
        ("mlp.up_proj", ("down_proj",)),
    }
    assert not skipped
    gqa = _llama(kv_heads=2)  # 4 query heads of 16, 2 value heads: o's columns tie in pairs
    groups, skipped = resolve_fold_groups(gqa, _linears(gqa))
    assert len(groups) == 8 and not skipped
    vo = next(g for g in groups if g.producer_name.endswith("layers.0.self_attn.v_proj"))
    j = torch.arange(64)
    assert torch.equal(vo.tie, (j // 16) // 2 * 16 + j % 16)
    partial = {m: n for m, n in _linears(gqa).items() if not n.endswith("k_proj")}
    groups, skipped = resolve_fold_groups(gqa, partial)
    assert not any(g.producer_name.endswith("input_layernorm") for g in groups)
    assert any("not quantized" in s for s in skipped)


@pytest.mark.parametrize(
    "build", [lambda: _llama(4), lambda: _llama(2), _gemma3], ids=["llama", "llama-gqa", "gemma3"]
)
def test_folding_keeps_the_function_and_resolve_folds_the_solved_scale(build) -> None:
    model = build()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    groups, _ = resolve_fold_groups(model, _linears(model))
    eye = {m: torch.eye(m.in_features) for m in _linears(model)}
    for g in sorted(groups, key=lambda g: not g.linear_producer):
        g.fold([eye[r] for r in g.readers])
    with torch.no_grad():
        folded = model(input_ids=ids).logits
    torch.testing.assert_close(folded, ref, atol=1e-4, rtol=1e-4)

    # Replace the readers by "codes" (a rounding of W / c0); after resolve each reader's
    # error is tr((W - Q diag(c)) H (...)^T) against its weight before folding, and the norm
    # carries the solved c.
    g = next(g for g in groups if not g.linear_producer)
    targets = [t.clone() for t in g.targets]
    codes = [torch.sign(r.weight.data) * r.weight.data.abs().mean() for r in g.readers]
    before = g.producer.weight.data.clone()
    c0 = g.scale.clone()
    info, errors, new = g.resolve(codes, 0.01)
    assert new is None and info["resolved"]
    assert info["relative_error"] < info["relative_error_initial_scale"]
    for w, q, e in zip(targets, codes, errors, strict=True):
        assert e == pytest.approx(float(((w - q * g.scale) ** 2).sum()), rel=1e-5)
    off = g.offset
    torch.testing.assert_close(
        off + g.producer.weight.data, (off + before) * g.scale / c0, atol=1e-5, rtol=1e-5
    )


def _unfold(model, scales: dict[str, torch.Tensor], original) -> torch.nn.Module:
    """The folded model written back in the original basis: norms as they were, readers'
    columns times c, linear producers' rows over c."""
    out = copy.deepcopy(model)
    groups, _ = resolve_fold_groups(out, _linears(out))
    with torch.no_grad():
        for g in groups:
            if g.producer_name not in scales:
                continue
            c = scales[g.producer_name]
            for r in g.readers:
                r.weight.mul_(c if g.tie is None else c[g.tie])
            if g.linear_producer:
                g.producer.weight.div_(c.unsqueeze(1))
            else:
                g.producer.weight.copy_(original.get_submodule(g.producer_name).weight)
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_oneshot_with_fold_scales(tiny_tokenizer, tmp_path, kv_heads) -> None:
    from llmcompressor.core import active_session
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens

    _llama(kv_heads=kv_heads, vocab=len(tiny_tokenizer) + 16).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    original = copy.deepcopy(model)
    ids = oneshot_on_random_tokens(model, tiny_tokenizer, RECIPE, vocab=model.config.vocab_size)
    mod = next(
        m
        for m in active_session().lifecycle.recipe.modifiers
        if type(m).__name__ == "BiVLMModifier"
    )
    scales = mod.folded_scales
    assert len(scales) == 8  # 4 producers x 2 layers
    # The norms changed: the scale lives there, not in the packed layers.
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, original.model.layers[0].input_layernorm.weight)
    # Every quantized linear's weight is its (rescaled) codes, so the packed save is exact.
    for name, codes in mod.codes.items():
        torch.testing.assert_close(
            model.get_submodule(name).weight.data, dequantize(codes), atol=1e-6, rtol=1e-5
        )
    # In the original basis the model is the same function: the fold is bookkeeping only.
    with torch.no_grad():
        got = model(input_ids=ids).logits
        back = _unfold(model, scales, original)(input_ids=ids).logits
    torch.testing.assert_close(got, back, atol=1e-4, rtol=1e-4)
    records = {r.name: r for r in mod.records}
    q0 = records["model.layers.0.self_attn.q_proj"]
    assert q0.info["folded_scale"]["into"] == "model.layers.0.input_layernorm"
    assert q0.info["folded_scale"]["error"] == pytest.approx(
        q0.error * 0 + sum(records[n].error for n in q0.info["folded_scale"]["readers"]), rel=1e-6
    )
    assert all(c.col_scale is None for c in mod.codes.values())  # nothing stored per column
    summary = mod.summary()  # the fold's own passes are timed apart from the layers'
    assert summary["fold_seconds"] > 0 and summary["quantize_seconds"] > 0
