"""BiVLMModifier through llm-compressor: registration, recipes, sequential calibration."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers the modifier)
from bivlm_plugin.core.hessian import HessianAccumulator  # noqa: E402
from bivlm_plugin.core.types import get_method  # noqa: E402

RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      method: {method}
      targets: [Linear]
      ignore: [lm_head]
      refine_iters: 1
"""


def _oneshot(model_dir, tokenizer, recipe: str):
    from llmcompressor.core import active_session
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = oneshot_on_random_tokens(model, tokenizer, recipe, vocab=model.config.vocab_size)
    mod = next(
        m
        for m in active_session().lifecycle.recipe.modifiers
        if type(m).__name__ == "BiVLMModifier"
    )
    return model, mod, ids


def test_registered_with_modifier_factory() -> None:
    from llmcompressor.modifiers.factory import ModifierFactory

    from bivlm_plugin.integrations.llmcompressor import register
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    register()  # idempotent: a second registration must not raise
    assert ModifierFactory._registered_registry["BiVLMModifier"] is BiVLMModifier


def test_recipe_field_typo_fails_naming_the_field() -> None:
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    with pytest.raises(ValueError, match="p_sall"):
        BiVLMModifier(p_sall=0.01)


def test_unknown_method_lists_available() -> None:
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    with pytest.raises(ValueError, match="billm"):
        BiVLMModifier(method="bilm")


def test_bad_method_args_name_the_fields() -> None:
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    with pytest.raises(ValueError, match="nonsense"):
        BiVLMModifier(method="rtn_sign", method_args={"nonsense": 1})  # at construction


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"p_sal": 0.7}, "p_sal"),
        ({"p_sal_vision": -0.1}, "p_sal_vision"),
        ({"n_rings": 0}, "n_rings"),
        ({"block_size": 0}, "block_size"),
        ({"bit_budget": 0.5}, r"bit_budget 0.5 is below what method 'bivlm' can reach"),
        ({"n_rings": 4, "bit_budget": 2.5}, r"n_rings=4: 3 bits"),
        ({"p_sal_candidates": [0.0, 0.6]}, "p_sal_candidates"),
        ({"method": "billm", "n_rings": 2}, r"\['n_rings'\] are not used by method 'billm'"),
        ({"method": "billm", "p_sal": 0.02}, r"\['p_sal'\] are not used"),
        ({"method": "arb_rc", "p_sal_vision": 0.05}, r"\['p_sal_vision'\] are not used"),
        ({"method": "rtn_sign", "block_size": 64}, r"\['block_size'\] are not used"),
        ({"method": "billm", "col_scale": True}, r"\['col_scale'\] are not used"),
        ({"method": "billm", "act_order": True}, r"\['act_order'\] are not used"),
        (
            {"method": "billm", "candidate_search": "encoded"},
            r"\['candidate_search'\] are not used",
        ),
        ({"candidate_search": "cheap"}, "candidate_search"),
        ({"method": "billm", "block_size": 64, "method_args": {"block_size": 32}}, "set each once"),
        (
            {"method": "billm", "allocation": "model"},
            r"\['allocation'\] are used by method 'bivlm' only",
        ),
        ({"method": "arb_rc", "n_rings_candidates": [1]}, "bivlm' only"),
        (
            {"allocation": "model", "p_sal_candidates": [0.0, 0.01]},
            "allocation: model needs bit_budget",
        ),
        ({"allocation": "model", "bit_budget": 1.3}, "nothing to allocate"),
        ({"allocation": "everywhere"}, "allocation"),
        ({"allocation_error": "absolute"}, "allocation_error: absolute is read by allocation"),
        (
            {
                "allocation": "model",
                "bit_budget": 1.3,
                "p_sal_candidates": [0.0, 0.01],
                "allocation_error": "squared",
            },
            "allocation_error",
        ),
        ({"n_rings_candidates": []}, "n_rings_candidates"),
        ({"method": "billm", "fold_scales": True}, r"\['fold_scales'\] are used by method 'bivlm'"),
        ({"fold_scales": True, "col_scale": True}, "choose one"),
        ({"fold_scales": True, "scale_mode": "ring"}, "fold_scales needs scale_mode: row_ring"),
        ({"n_rings_candidates": [1, 300]}, r"ring counts in \[1, 256\]"),
        ({"n_rings_candidates": [2, 4], "bit_budget": 1.5}, r"n_rings=2: 2 bits"),
    ],
)
def test_every_recipe_field_is_used_or_rejected_at_construction(fields, message) -> None:
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    with pytest.raises(ValueError, match=message):
        BiVLMModifier(**fields)


def test_shared_fields_reach_the_baselines() -> None:
    """A baseline gets the shared knobs a recipe sets (under its own names), and its authors'
    defaults for the rest."""
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    cfg = BiVLMModifier(method="billm", block_size=64, dampening_frac=0.05).layer_config("language")
    assert (cfg.block_size, cfg.percdamp, cfg.compensate) == (64, 0.05, True)
    assert BiVLMModifier(method="billm").layer_config("language").block_size == 128
    # The authors' block update by default; a recipe may ask for ours (method_args).
    assert BiVLMModifier(method="arb_rc").layer_config("language").faithful is True
    ours = BiVLMModifier(method="billm", method_args={"faithful": False})
    assert ours.layer_config("language").faithful is False
    with pytest.raises(ValueError, match="faithful"):
        BiVLMModifier(method="billm", method_args={"faithful": "yes"})


def test_vision_layers_take_their_own_salient_share() -> None:
    """With a language-model share search under a budget, vision linears keep p_sal_vision
    (and no per-layer cap) unless the recipe gives them candidates of their own."""
    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier

    mod = BiVLMModifier(
        n_rings=2, p_sal_vision=0.05, p_sal_candidates=[0.0, 0.01], bit_budget=2.25, scope="all"
    )
    lang, vis = mod.layer_config("language"), mod.layer_config("vision")
    assert lang.p_sal_candidates == (0.0, 0.01) and lang.bit_budget == 2.25
    assert vis.p_sal == 0.05 and vis.p_sal_candidates is None and vis.bit_budget is None
    mod = BiVLMModifier(n_rings=2, p_sal_candidates_vision=[0.02, 0.05], bit_budget=2.5)
    vis = mod.layer_config("vision")
    assert vis.p_sal_candidates == (0.02, 0.05) and vis.bit_budget == 2.5


def test_recipe_without_stage_nesting_is_rejected(tmp_path) -> None:
    from bivlm_plugin.integrations.llmcompressor.recipe import load_recipe

    bad = tmp_path / "flat.yaml"
    bad.write_text("BiVLMModifier:\n  method: bivlm\n")
    with pytest.raises(ValueError, match="does not end in '_stage'.*silently"):
        load_recipe(bad)
    bad.write_text("quant_stage:\n  quant:\n    BiVLMModifier: {}\n")
    with pytest.raises(ValueError, match="quant_stage.quant is not a '<name>_modifiers'"):
        load_recipe(bad)


def test_shipped_recipes_are_well_formed() -> None:
    from pathlib import Path

    from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier
    from bivlm_plugin.integrations.llmcompressor.recipe import load_recipe, recipe_modifiers

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        args = recipe_modifiers(load_recipe(path), str(path)).get("BiVLMModifier")
        if args is not None:
            BiVLMModifier(**args)  # every field valid and used


def test_no_matching_targets_is_an_error(tiny_llama_dir, tiny_tokenizer) -> None:
    recipe = RECIPE.format(method="bivlm").replace("[Linear]", "['re:.*does_not_exist.*']")
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        _oneshot(tiny_llama_dir, tiny_tokenizer, recipe)


@pytest.mark.parametrize("method", ["bivlm", "rtn_sign", "billm"])
def test_oneshot_quantizes_every_decoder_linear(tiny_llama_dir, tiny_tokenizer, method) -> None:
    recipe = RECIPE.format(method=method)
    if method != "bivlm":  # refine_iters is a Bi-VLM knob: baselines reject it
        recipe = recipe.replace("      refine_iters: 1\n", "")
    model, mod, _ = _oneshot(tiny_llama_dir, tiny_tokenizer, recipe)
    summary = mod.summary()
    n_layers = model.config.num_hidden_layers
    assert summary["n_layers"] == 7 * n_layers  # q k v o gate up down
    assert {r["name"].rsplit(".", 1)[-1] for r in summary["layers"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert 1.0 <= summary["weight_bits"] < summary["storage_bits"]
    # Binarized rows hold few distinct values; the untouched embedding holds many.
    w = model.model.layers[0].mlp.up_proj.weight
    assert max(row.unique().numel() for row in w) <= 8
    assert model.model.embed_tokens.weight[0].unique().numel() > 32


def test_each_layer_is_calibrated_on_quantized_predecessors(tiny_llama_dir, tiny_tokenizer) -> None:
    """Layer 1's q_proj must equal quantizing its original weight with the Hessian of inputs
    that flow through the *quantized* layer 0 (llm-compressor's sequential pipeline)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model, mod, ids = _oneshot(tiny_llama_dir, tiny_tokenizer, RECIPE.format(method="bivlm"))
    target = model.model.layers[1].self_attn.q_proj
    acc = HessianAccumulator(target.in_features)
    handle = target.register_forward_hook(lambda m, a, o: acc.add(a[0]))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    handle.remove()
    quantize, _ = get_method("bivlm")
    expected = quantize(
        original.model.layers[1].self_attn.q_proj.weight.float(),
        acc.hessian,
        mod.layer_config("language"),
    ).w_hat
    assert torch.allclose(target.weight, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "imports",
    [
        "import bivlm_plugin; import llmcompressor",
        "import llmcompressor; import bivlm_plugin",
        "import bivlm_plugin.app.quantize",
        "import bivlm_plugin.integrations.llmcompressor.modifier",
    ],
)
def test_registration_in_any_import_order(imports: str) -> None:
    import subprocess
    import sys

    code = (
        f"{imports}\nfrom llmcompressor.modifiers.factory import ModifierFactory as F\n"
        "print(F._registered_registry['BiVLMModifier'].__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("BiVLMModifier")


def test_plain_import_does_not_import_llmcompressor() -> None:
    import subprocess
    import sys

    code = "import sys, bivlm_plugin, bivlm_plugin.cli; print('llmcompressor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
