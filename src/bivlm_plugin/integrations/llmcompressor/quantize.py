"""``bivlm quantize``: llm-compressor ``oneshot`` with P1 calibration and a bit report.

The output folder is written through a temporary sibling and renamed into place after the model,
tokenizer and ``bivlm_report.json`` are all saved: an interrupted run leaves nothing loadable.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier
from bivlm_plugin.integrations.llmcompressor.recipe import load_recipe, recipe_modifiers
from bivlm_plugin.utils import atomic_directory, environment_info

__all__ = ["apply_overrides", "parse_override", "quantize_text_model"]

logger = logging.getLogger(__name__)

FAKE_QUANT_NOTE = (
    "weights are fake-quantized: the dequantized Bi-VLM values are stored as bf16, not packed; "
    "storage_bits is what the packed layout will take"
)


def quantize_text_model(
    model_dir: str | Path,
    recipe: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    num_calibration_samples: int | None = None,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Quantize a causal LM with a recipe, calibrating on protocol P1's WikiText-2 windows.

    Args:
        overrides: field values set on every modifier of the recipe (``--set key=value``), e.g.
            for ablations; a field the modifier does not have fails at construction.

    Returns:
        The report written to ``output/bivlm_report.json``.
    """
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bivlm_plugin.eval.data import P1, p1_windows

    model_dir, output = Path(model_dir), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite or choose a new folder")
    parsed = apply_overrides(load_recipe(recipe), overrides or {})
    tok = AutoTokenizer.from_pretrained(model_dir)
    windows = p1_windows(tok, "calib", data=data)
    if num_calibration_samples is not None:
        if not 0 < num_calibration_samples <= windows.shape[0]:
            raise ValueError(
                f"num_calibration_samples must be in 1..{windows.shape[0]}, "
                f"got {num_calibration_samples}"
            )
        windows = windows[:num_calibration_samples]
    dataset = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)

    start = time.perf_counter()
    oneshot(
        model=model,
        recipe=yaml.safe_dump(parsed, sort_keys=False),
        dataset=dataset,
        num_calibration_samples=windows.shape[0],
        max_seq_length=P1.seqlen,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    modifiers = active_session().lifecycle.recipe.modifiers
    ours = [m for m in modifiers if isinstance(m, BiVLMModifier)]
    if ours:
        summary = _merge([m.summary() for m in ours])
        fmt = {"format": "fake-quantized bf16", "note": FAKE_QUANT_NOTE}
    else:
        summary = _framework_summary(model, recipe_modifiers(parsed))
        fmt = {"format": "compressed-tensors (llm-compressor's own)"}
    report = {
        **{k: v for k, v in summary.items() if k != "layers"},
        "seconds": seconds,
        **fmt,
        "recipe": parsed,
        "source_model": str(model_dir.resolve()),
        "calibration": {"protocol": P1.name, "windows": int(windows.shape[0]), "seqlen": P1.seqlen},
        "environment": environment_info(),
        "layers": summary.get("layers", []),
    }
    _save_atomically(model, tok, report, output)
    return report


def apply_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set ``overrides`` on every modifier of a parsed recipe (returns a new mapping)."""
    if not overrides:
        return recipe
    out = copy.deepcopy(recipe)
    for stage in out.values():
        for group in stage.values():
            for name in group:
                group[name] = {**(group[name] or {}), **overrides}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (``n_rings=2``, ``compensate=false``, ``x=[0, 0.01]``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r} is not key=value (e.g. --set n_rings=2)")
    return key.strip(), yaml.safe_load(value)


def _framework_summary(model: torch.nn.Module, modifiers: dict[str, dict]) -> dict:
    """Bits of llm-compressor's own weight-only schemes (the GPTQ peer), counted by our rules:
    b bits per weight + an fp16 scale per group (+ a b-bit zero point per group if asymmetric)."""
    layers, n_total, bits_total, plane_total = [], 0, 0.0, 0.0
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or not isinstance(module, torch.nn.Linear):
            continue
        out_f, in_f = module.weight.shape
        group = args.group_size if args.group_size and args.group_size > 0 else in_f
        per_group = 16 + (0 if args.symmetric else args.num_bits)
        storage = args.num_bits + per_group / group
        layers.append(
            {
                "name": name,
                "shape": [out_f, in_f],
                "weight_bits": args.num_bits,
                "storage_bits": storage,
            }
        )
        n_total += out_f * in_f
        bits_total += storage * out_f * in_f
        plane_total += args.num_bits * out_f * in_f
    if n_total == 0:
        raise ValueError(f"recipe modifiers {sorted(modifiers)} quantized no Linear weights")
    return {
        "method": "+".join(sorted(modifiers)),
        "n_layers": len(layers),
        "n_weights": n_total,
        "weight_bits": plane_total / n_total,
        "storage_bits": bits_total / n_total,
        "layers": layers,
    }


def _merge(summaries: list[dict]) -> dict:
    if len(summaries) == 1:
        return summaries[0]
    layers = [lay for s in summaries for lay in s.get("layers", [])]
    n = sum(s["n_weights"] for s in summaries)
    return {
        "method": "+".join(s["method"] for s in summaries),
        "n_layers": len(layers),
        "n_weights": n,
        "weight_bits": sum(s["weight_bits"] * s["n_weights"] for s in summaries) / n,
        "storage_bits": sum(s["storage_bits"] * s["n_weights"] for s in summaries) / n,
        "quantize_seconds": sum(s["quantize_seconds"] for s in summaries),
        "layers": layers,
    }


def _save_atomically(model, tok, report: dict, output: Path) -> None:
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "bivlm_report.json").write_text(json.dumps(report, indent=2) + "\n")
