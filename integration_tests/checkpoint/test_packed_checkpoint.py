"""Packed bivlm-binary checkpoints: oneshot -> save_pretrained -> from_pretrained, kept packed.

Tolerances below were measured once on this machine and are written as floors (STYLE.md #8).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers with llm-compressor / transformers / c-t)
from bivlm_plugin.format.checkpoint import (  # noqa: E402
    FORMAT_NAME,
    read_safetensors_header,
    storage_bits_from_files,
)
from bivlm_plugin.format.codes import pack, storage_bits  # noqa: E402

RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      targets: [Linear]
      ignore: [lm_head]
      p_sal: 0.02
      p_sal_vision: 0.05
      refine_iters: 1
      scope: {scope}
"""
# Measured (CPU kernel, float32): max |logits(packed BinaryLinear) - logits(fake-quantized model)|
# = 3.6e-07 on logits up to 1.48 (tiny LLaMA) and 2.7e-07 on logits up to 0.63 (tiny LLaVA,
# vision + language quantized). The bound leaves room for another kernel's summation order.
LOGIT_ATOL = 1e-4
# Resident bytes of the BinaryLinears' buffers over the bytes their tensors take in the files:
# measured exactly 1.0 (the same tensors, no dense copy, nothing added at load); that is 2.10
# bits per weight on the tiny LLaMA (in_features 64, so per-row scales weigh a lot). The first
# forward adds the CPU kernel's salient plan (int16 per salient weight), checked separately.
RESIDENT_RATIO_MAX = 1.0


def _modifier():
    from oneshot_helpers import bivlm_modifier

    return bivlm_modifier()


@pytest.fixture(scope="module")
def packed_llama(tiny_llama_dir, tiny_tokenizer, tmp_path_factory):
    """oneshot on the tiny LLaMA, then llm-compressor's save_pretrained(save_compressed=True)."""
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = oneshot_on_random_tokens(model, tiny_tokenizer, RECIPE.format(scope="language"), 300)
    codes = _modifier().codes
    with torch.no_grad():
        ref = model(ids).logits
    out = tmp_path_factory.mktemp("packed_llama")
    model.save_pretrained(out, save_compressed=True)
    tiny_tokenizer.save_pretrained(out)
    return {"dir": out, "codes": codes, "ids": ids, "ref": ref}


def test_save_writes_packed_tensors_and_names_the_format(packed_llama) -> None:
    cfg = json.loads((packed_llama["dir"] / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == FORMAT_NAME and cfg["quant_method"] == "compressed-tensors"
    (group,) = cfg["config_groups"].values()
    assert group["format"] == FORMAT_NAME
    codes = packed_llama["codes"]
    assert sorted(group["targets"]) == sorted(codes) and len(codes) == 14
    header = read_safetensors_header(packed_llama["dir"] / "model.safetensors")
    for name in codes:
        assert f"{name}.weight" not in header
        assert header[f"{name}.signs"][0] == "I32"
    assert "model.embed_tokens.weight" in header  # unquantized layers stay dense
    bits = storage_bits_from_files(packed_llama["dir"])
    for name, c in codes.items():
        assert bits[name] == pytest.approx(storage_bits(pack(c), _layout(c)), rel=1e-12)


def _layout(c):
    from bivlm_plugin.format.codes import layout_of

    return layout_of(c)


def test_from_pretrained_keeps_layers_packed(packed_llama) -> None:
    from transformers import AutoModelForCausalLM

    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    model = AutoModelForCausalLM.from_pretrained(packed_llama["dir"], dtype=torch.float32)
    codes = packed_llama["codes"]
    for name in codes:
        mod = model.get_submodule(name)
        assert isinstance(mod, BinaryLinear)
        assert not any(n == "weight" for n, _ in mod.named_parameters())
        assert mod.scales.dtype == torch.float16 and mod.signs.dtype == torch.int32
    resident = sum(model.get_submodule(n).storage_bytes() for n in codes)
    all_buffers = sum(
        b.numel() * b.element_size() for n in codes for b in model.get_submodule(n).buffers()
    )
    n_weights = sum(c.shape[0] * c.shape[1] for c in codes.values())
    bits = storage_bits_from_files(packed_llama["dir"])
    file_bytes = sum(bits[n] * c.shape[0] * c.shape[1] / 8 for n, c in codes.items())
    assert all_buffers == resident
    assert 1.0 <= resident / file_bytes <= RESIDENT_RATIO_MAX + 1e-9
    assert resident * 8 / n_weights < 4  # vs 32 bits per weight for the dense fp32 layers

    with torch.no_grad():
        got = model(packed_llama["ids"]).logits
    diff = (got - packed_llama["ref"]).abs().max().item()
    assert diff <= LOGIT_ATOL, f"packed vs fake-quantized logits differ by {diff}"
    # After a forward the CPU kernel holds its salient plan (int16 per salient weight, rows
    # padded to 16): counted, and no more than that.
    from bivlm_plugin.kernels import cpu

    if cpu.load_extension() is not None:
        plan = 0
        for n in codes:
            lay = model.get_submodule(n).layout
            plan += -(-lay.out_features // 16) * 16 * lay.k * 2
        after = sum(model.get_submodule(n).storage_bytes() for n in codes)
        assert after - resident == plan


def test_optimum_style_entry_point(packed_llama, tiny_llama_dir) -> None:
    from bivlm_plugin.auto import BiVLMForCausalLM
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    model = BiVLMForCausalLM.from_pretrained(packed_llama["dir"])
    assert isinstance(model.model.layers[0].mlp.down_proj, BinaryLinear)
    with pytest.raises(ValueError, match="not a packed bivlm-binary checkpoint"):
        BiVLMForCausalLM.from_pretrained(tiny_llama_dir)


def test_save_is_atomic(tmp_path) -> None:
    from bivlm_plugin.app.quantize import _save_atomically

    class Boom:
        dtype = torch.bfloat16  # _save_atomically casts a float32-calibrated model first

        def save_pretrained(self, path, **kwargs):
            (path / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save_atomically(Boom(), Boom(), {"layers": []}, tmp_path / "out", {"x": 8})
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary sibling


def test_duplicate_registration_is_harmless() -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from transformers.quantizers import auto

    from bivlm_plugin.integrations import compressed_tensors as ct_int
    from bivlm_plugin.integrations import transformers as tf_int

    before = (
        dict(auto.AUTO_QUANTIZER_MAPPING),
        dict(auto.AUTO_QUANTIZATION_CONFIG_MAPPING),
        len(list(CompressionFormat)),
    )
    for _ in range(2):
        tf_int.register()
        assert ct_int.register() is True
    after = (
        dict(auto.AUTO_QUANTIZER_MAPPING),
        dict(auto.AUTO_QUANTIZATION_CONFIG_MAPPING),
        len(list(CompressionFormat)),
    )
    assert before == after
    assert BaseCompressor.get_value_from_registry(FORMAT_NAME).__name__ == "BivlmBinaryCompressor"
    assert CompressionFormat(FORMAT_NAME).value == FORMAT_NAME


def test_unsupported_compressed_tensors_version_fails_clearly(monkeypatch, caplog) -> None:
    from bivlm_plugin.integrations import compressed_tensors as ct_int
    from bivlm_plugin.integrations.compressed_tensors import seam
    from bivlm_plugin.integrations.compressed_tensors.compressor import BivlmBinaryCompressor

    with pytest.raises(seam.UnsupportedCompressedTensorsError) as err:
        seam.check_version("0.12.0")
    msg = str(err.value)
    assert "compressed-tensors 0.12.0" in msg and ">=0.19" in msg and "pip install" in msg
    monkeypatch.setattr(seam, "installed_version", lambda: "0.21.0")
    with caplog.at_level(logging.WARNING):
        assert ct_int.register() is False  # import-time path: a warning, never a crash
    assert "0.21.0" in caplog.text
    with pytest.raises(seam.UnsupportedCompressedTensorsError, match="0.21.0"):
        BivlmBinaryCompressor.decompress({}, None)


def test_compressed_tensors_dispatch_round_trip() -> None:
    """compressed-tensors' own compress_module / decompress_module reach our compressor."""
    from compressed_tensors.compressors.base import compress_module, decompress_module
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from bivlm_plugin.core.binarize import dequantize
    from bivlm_plugin.format.checkpoint import attach_codes
    from bivlm_plugin.format.synthetic import random_codes

    codes = random_codes(45, 83, n_rings=2, k=3, seed=3)  # awkward shapes
    lin = torch.nn.Linear(83, 45)
    with torch.no_grad():
        lin.weight.copy_(dequantize(codes))
    bias = lin.bias.detach().clone()
    attach_codes(lin, codes)
    lin.quantization_scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=1), format=FORMAT_NAME
    )
    compress_module(lin)
    state = dict(lin.named_parameters())
    assert "weight" not in state and state["signs"].dtype == torch.int32
    decompress_module(lin)
    assert torch.equal(lin.weight, dequantize(codes)) and torch.equal(lin.bias, bias)


def test_compressor_refuses_a_weight_without_codes() -> None:
    from bivlm_plugin.integrations.compressed_tensors.compressor import BivlmBinaryCompressor

    with pytest.raises(ValueError, match="calibrated Bi-VLM codes"):
        BivlmBinaryCompressor.compress({"weight": torch.zeros(4, 4)}, None)


def test_llava_loads_packed_with_image_text_to_text(tmp_path) -> None:
    from llmcompressor import oneshot
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    from bivlm_plugin.auto import BiVLMForImageTextToText
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear
    from tiny_vlms import FAMILIES, collate, dataset

    torch.manual_seed(0)
    FAMILIES["llava"].model().save_pretrained(tmp_path / "src")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "src", dtype=torch.float32)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    oneshot(
        model=model,
        processor=tok,
        recipe=RECIPE.format(scope="all"),
        dataset=dataset("llava", 2),
        data_collator=collate,
        num_calibration_samples=2,
        max_seq_length=64,
    )
    codes = _modifier().codes
    sample = FAMILIES["llava"].sample(torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(**sample).logits
    model.save_pretrained(tmp_path / "q", save_compressed=True)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q", dtype=torch.float32)
    parts = {("vision" if "vision_tower" in n else "language") for n in codes}
    assert parts == {"vision", "language"}
    for name in codes:
        assert isinstance(loaded.get_submodule(name), BinaryLinear), name
    with torch.no_grad():
        got = loaded(**sample).logits
    assert (got - ref).abs().max().item() <= LOGIT_ATOL
    again = BiVLMForImageTextToText.from_pretrained(tmp_path / "q")
    assert isinstance(again.get_submodule(next(iter(codes))), BinaryLinear)
    # dtype= reaches every dense parameter although transformers keeps checkpoint dtypes for
    # the keys it renames (all of a VLM's); packed buffers keep their stored dtypes.
    half = AutoModelForImageTextToText.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    packed = half.get_submodule(next(iter(codes)))
    assert packed.signs.dtype == torch.int32 and packed.scales.dtype == torch.float16


def test_bivlm_quantize_writes_packed_and_eval_ppl_loads_it(
    tiny_llama_dir, wikitext_dir, tmp_path
) -> None:
    from pathlib import Path

    from bivlm_plugin.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "bivlm_lm_w1.yaml"
    common = ["--recipe", str(recipe), "--data", str(wikitext_dir)]
    common += ["--num-calibration-samples", "1", "--set", "refine_iters=0"]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--output", str(out), *common]) == 0
    report = json.loads((out / "bivlm_report.json").read_text())
    assert report["format"] == FORMAT_NAME and report["packed_layers"] == 14
    for layer in report["layers"]:  # bits of the files == bits the quantizer counted + padding
        assert layer["storage_bits_from_files"] >= layer["weight_bits"]
    assert 1.0 < report["storage_bits_from_files"] < 3.0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == FORMAT_NAME
    assert not list(tmp_path.glob(".q.*"))

    ppl = tmp_path / "ppl.json"
    args = ["eval", "ppl", "--model", str(out), "--data", str(wikitext_dir), "--json", str(ppl)]
    assert main([*args, "--batch-size", "16"]) == 0
    assert json.loads(ppl.read_text())["n_tokens"] == 32704

    fake = tmp_path / "fake"
    argv = ["quantize", "--model", str(tiny_llama_dir), "--output", str(fake), "--fake-quant"]
    assert main([*argv, *common]) == 0
    assert json.loads((fake / "bivlm_report.json").read_text())["format"] == "fake-quantized bf16"
    assert "quantization_config" not in json.loads((fake / "config.json").read_text())


ALLOCATION_RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      targets: [Linear]
      ignore: [lm_head]
      refine_iters: 1
      allocation: model
      bit_budget: 2.6
      n_rings_candidates: [1, 2]
      p_sal_candidates: [0.0, 0.02, 0.05]
"""


def test_model_wide_allocation_mixes_layouts_and_serves_packed(
    tiny_llama_dir, tiny_tokenizer, tmp_path
) -> None:
    """allocation: model gives layers different salient shares and ring counts under one
    model-wide average; the mixed layouts save packed and load back with equal logits."""
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens, packed_roundtrip

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = oneshot_on_random_tokens(model, tiny_tokenizer, ALLOCATION_RECIPE, 300)
    mod = _modifier()
    summary = mod.summary()
    assert summary["allocation"] == {"mode": "model", "bit_budget": 2.6, "error": "relative"}
    assert summary["storage_bits"] <= 2.6 + 1e-9
    chosen = {(lay["info"]["p_sal"], lay["info"]["n_rings"]) for lay in summary["layers"]}
    assert len(chosen) >= 2, chosen  # the budget was spent unevenly
    for lay in summary["layers"]:
        opts = lay["info"]["allocation"]["options"]
        assert len(opts) == 6  # 3 shares x 2 ring counts, each fully quantized
        mine = [
            o
            for o in opts
            if (o["p_sal"], o["n_rings"]) == (lay["info"]["p_sal"], lay["info"]["n_rings"])
        ]
        assert mine and mine[0]["storage_bits"] == pytest.approx(lay["storage_bits"])
    diff, from_files = packed_roundtrip(model, ids, tmp_path, summary["layers"])
    assert diff <= LOGIT_ATOL
    # The files add byte padding of the sparse second plane over count_bits (see
    # test_quantize_cli): at most 7 bits per row.
    assert from_files - summary["storage_bits"] <= 7 / 64 + 1e-9


@pytest.mark.parametrize(
    ("currency", "search"),
    [("relative", "full"), ("absolute", "full"), ("absolute", "refined")],
)
def test_model_wide_allocation_trades_the_chosen_error_against_bits(
    currency, search, tiny_llama_dir, tiny_tokenizer
) -> None:
    """allocation_error picks the error the ledger minimizes: each decoder layer's choice is
    core.allocate's on the recorded options with that error, under the budget left then.
    With candidate_search: refined the options carry proxy errors and the model still fits."""
    from transformers import AutoModelForCausalLM

    from bivlm_plugin.core.allocate import allocate
    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    recipe = ALLOCATION_RECIPE.replace("bit_budget: 2.6", "bit_budget: 2.3") + (
        f"      allocation_error: {currency}\n      candidate_search: {search}\n"
    )
    oneshot_on_random_tokens(model, tiny_tokenizer, recipe, 300)
    summary = _modifier().summary()
    assert summary["allocation"] == {"mode": "model", "bit_budget": 2.3, "error": currency}
    assert summary["storage_bits"] <= 2.3 + 1e-9
    groups: dict[str, list[dict]] = {}
    for lay in summary["layers"]:
        groups.setdefault(lay["name"].split(".self_attn")[0].split(".mlp")[0], []).append(lay)
    label = "error" if search == "full" else "proxy_error"
    key = f"relative_{label}" if currency == "relative" else label
    other = label if currency == "relative" else f"relative_{label}"
    differs = False
    for layers in groups.values():
        opts = [lay["info"]["allocation"]["options"] for lay in layers]
        assert all(lay["info"]["allocation"]["compared_on"] == label for lay in layers)
        assert all(lay["info"]["candidate_search"] == search for lay in layers)
        sizes = [lay["shape"][0] * lay["shape"][1] for lay in layers]
        left = layers[0]["info"]["allocation"]["budget_left_per_weight"]
        want = allocate(
            [[(o["storage_bits"], o[key]) for o in op] for op in opts], sizes, left * sum(sizes)
        )
        got = [
            next(
                i
                for i, o in enumerate(op)
                if (o["p_sal"], o["n_rings"]) == (lay["info"]["p_sal"], lay["info"]["n_rings"])
            )
            for op, lay in zip(opts, layers, strict=True)
        ]
        assert got == want
        differs |= got != allocate(
            [[(o["storage_bits"], o[other]) for o in op] for op in opts], sizes, left * sum(sizes)
        )
    assert differs  # the two currencies disagree somewhere here, so the option is exercised
