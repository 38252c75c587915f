"""``bivlm quantize``: llm-compressor ``oneshot`` with P1 calibration and a bit report.

By default the output is the packed ``bivlm-binary`` checkpoint (``docs/FORMAT.md``): Bi-VLM
layers are saved as packed tensors through compressed-tensors, everything else stays dense, and
the report's ``storage_bits_from_files`` is computed from the safetensors files actually
written. ``fake_quant=True`` (``--fake-quant``) writes the old bf16 fake-quantized weights.
Recipes of llm-compressor's own modifiers (GPTQ, QuantizationModifier) are saved in its
compressed format (e.g. ``pack-quantized``, which vLLM serves), or dense with ``fake_quant``.

The output folder is written through a temporary sibling and renamed into place after the model,
tokenizer and ``bivlm_report.json`` are all saved: an interrupted run leaves nothing loadable.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bivlm_plugin.app.recipes import find_recipe
from bivlm_plugin.format.checkpoint import FORMAT_NAME, storage_bits_from_files
from bivlm_plugin.format.serving_keys import rewrite_checkpoint_keys
from bivlm_plugin.integrations.llmcompressor.modifier import BiVLMModifier
from bivlm_plugin.integrations.llmcompressor.packed import detach_packed, packed_modules
from bivlm_plugin.integrations.llmcompressor.recipe import load_recipe, recipe_modifiers
from bivlm_plugin.pruning.scores import (
    CONFIG_KEY,
    SERVING_FAMILIES,
    SERVING_FAMILY_SCORES,
    SERVING_SCORES,
    check_prune_merge,
    keep_count,
)
from bivlm_plugin.utils import atomic_directory, environment_info, torch_dtype

__all__ = [
    "apply_overrides",
    "collate_one",
    "easy_vqa_calibration",
    "parse_override",
    "quantize_model",
    "quantize_text_model",
]

logger = logging.getLogger(__name__)

FAKE_QUANT_NOTE = (
    "weights are fake-quantized: the dequantized Bi-VLM values are stored as bf16, not packed; "
    "storage_bits is what the packed layout will take"
)
PACKED_NOTE = (
    f"quantized layers are stored packed ({FORMAT_NAME}, docs/FORMAT.md); "
    "storage_bits_from_files counts the bytes of their tensors in the safetensors files"
)


@dataclass
class _Calibration:
    model: torch.nn.Module
    processor: Any
    dataset: Any
    collator: Any
    n_samples: int
    max_seq_length: int
    info: dict[str, Any]


def quantize_model(
    model_dir: str | Path,
    recipe: str | Path,
    output: str | Path,
    data: str | Path | None = None,
    num_calibration_samples: int | None = None,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
    fake_quant: bool = False,
    prune_ratio: float = 0.0,
    prune_score: str = "feature_norm",
    prune_merge: bool = False,
    calibration_text_tokens: int | None = None,
    calibration_offset: int = 0,
    calibration_dtype: str = "auto",
) -> dict[str, Any]:
    """Quantize a model folder with a recipe and save it (atomically) with a bit report.

    Text models calibrate on protocol P1's WikiText-2 windows (128 x 512 tokens); VLMs (a config
    with a ``vision_config``) on easy-VQA train image-question-answer triples (128 by default),
    formatted with the processor's chat template, each followed by ``calibration_text_tokens``
    tokens of a P1 calibration window (WikiText-2 valid) so the language model's layers also see
    plain text (see ``easy_vqa_calibration``).

    Args:
        overrides: field values set on every modifier of the recipe (``--set key=value``), e.g.
            for ablations; a field the modifier does not have fails at construction.
        fake_quant: save dequantized bf16 weights instead of the packed format.
        prune_ratio, prune_score, prune_merge: visual-token pruning the checkpoint asks
            servers for (``bivlm_pruning`` in ``config.json``; vLLM applies it, a user can
            override it); ratio 0 writes nothing. ``prune_merge`` merges each pruned token into
            the kept token it is most like instead of dropping it.
        calibration_text_tokens: VLMs only: WikiText tokens appended to each calibration
            triple (default ``VLM_CALIBRATION_TEXT_TOKENS``; 0: triples only).
        calibration_offset: text models: skip this many P1 calibration windows first (128:
            the next 128 windows, a disjoint set, to measure calibration spread).
        calibration_dtype: dtype the model runs in while calibrating: ``"auto"`` (bfloat16 on
            CUDA or a CPU with native bf16, else float32), ``"bfloat16"`` or ``"float32"``.
            float32 gives each layer inputs free of bf16 rounding (slower; RESULTS section 9:
            GPTQ W3A16 78.8 vs 89.8 P1 calibrated in bf16); the saved weights are bf16 either way.

    Returns:
        The report written to ``output/bivlm_report.json``.
    """
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from transformers import AutoConfig

    model_dir, output = Path(model_dir), Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} exists; pass --overwrite or choose a new folder")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir} is not a model folder (no config.json)")
    pruning = _pruning_entry(prune_ratio, prune_score, prune_merge)
    dtype = calibration_torch_dtype(calibration_dtype)
    parsed = apply_overrides(load_recipe(find_recipe(recipe)), overrides or {})
    if not fake_quant and any(args.get("col_scale") for args in recipe_modifiers(parsed).values()):
        raise ValueError(
            "the recipe sets col_scale: true, whose layers the packed bivlm-binary format cannot "
            "hold yet (they would be saved dense at 16 bits); pass --fake-quant (fake_quant=True) "
            "or set col_scale: false"
        )
    config = AutoConfig.from_pretrained(model_dir)
    is_vlm = getattr(config, "vision_config", None) is not None
    if pruning and config.model_type not in SERVING_FAMILIES:
        raise ValueError(
            f"--prune-ratio: visual-token pruning is served for {list(SERVING_FAMILIES)}, not "
            f"model_type {config.model_type!r}; drop --prune-ratio"
        )
    if pruning and pruning["score"] not in SERVING_FAMILY_SCORES[config.model_type]:
        raise ValueError(
            f"--prune-score {pruning['score']!r} cannot be served for {config.model_type}; use "
            f"one of {list(SERVING_FAMILY_SCORES[config.model_type])}"
        )
    if is_vlm and calibration_offset:
        raise ValueError(
            f"--calibration-offset {calibration_offset} is for text models (P1 windows); VLMs "
            "calibrate on easy-VQA train triples"
        )
    if is_vlm:
        calib = _vlm_calibration(
            model_dir, data, num_calibration_samples, calibration_text_tokens, dtype
        )
    elif calibration_text_tokens is not None:
        raise ValueError(
            "--calibration-text-tokens is for VLMs; text models calibrate on whole P1 windows"
        )
    else:
        calib = _text_calibration(
            model_dir, data, num_calibration_samples, calibration_offset, dtype
        )

    start = time.perf_counter()
    oneshot(
        model=calib.model,
        processor=calib.processor,
        recipe=yaml.safe_dump(parsed, sort_keys=False),
        dataset=calib.dataset,
        data_collator=calib.collator,
        num_calibration_samples=calib.n_samples,
        max_seq_length=calib.max_seq_length,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    modifiers = active_session().lifecycle.recipe.modifiers
    ours = [m for m in modifiers if isinstance(m, BiVLMModifier)]
    if ours and fake_quant:
        detach_packed(calib.model)
    packed = packed_modules(calib.model)
    if ours:
        summary = _merge([m.summary() for m in ours])
        if packed:
            fmt = {"format": FORMAT_NAME, "note": PACKED_NOTE}
        else:
            fmt = {"format": "fake-quantized bf16", "note": FAKE_QUANT_NOTE}
    else:
        summary = _framework_summary(calib.model, recipe_modifiers(parsed))
        fmt = {"format": "compressed-tensors (llm-compressor's own)"}
    report = {
        **{k: v for k, v in summary.items() if k != "layers"},
        "seconds": seconds,
        **fmt,
        "recipe": parsed,
        "source_model": str(model_dir.resolve()),
        "calibration": calib.info,
        "calibration_dtype": str(calib.model.dtype).removeprefix("torch."),
        "environment": environment_info(),
        "layers": summary.get("layers", []),
    }
    in_features = {n: calib.model.get_submodule(n).in_features for n in packed}
    compressed = bool(in_features) or (not ours and not fake_quant)
    if pruning:
        report[CONFIG_KEY] = pruning
    _save_atomically(calib.model, calib.processor, report, output, in_features, compressed, pruning)
    return report


def _pruning_entry(ratio: float, score: str, merge: bool = False) -> dict[str, Any] | None:
    keep_count(1, ratio)  # raises on a ratio outside [0, 1), naming it
    check_prune_merge(ratio, merge)
    if score not in SERVING_SCORES:
        raise ValueError(
            f"--prune-score {score!r} cannot be served; use one of {list(SERVING_SCORES)} "
            "(text-agnostic scores)"
        )
    if not ratio:
        return None
    return {"ratio": float(ratio), "score": score, **({"merge": True} if merge else {})}


quantize_text_model = quantize_model  # the name of the text-only first version


def _check_count(n: int | None, available: int) -> int:
    if n is None:
        return available
    if not 0 < n <= available:
        raise ValueError(f"num_calibration_samples must be in 1..{available}, got {n}")
    return n


def _text_calibration(
    model_dir: Path, data, n: int | None, offset: int = 0, dtype: torch.dtype | None = None
) -> _Calibration:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bivlm_plugin.eval.data import P1, p1_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    n_windows = _check_count(n, P1.calib_windows)
    windows = p1_windows(tok, "calib", data=data, offset=offset)[:n_windows]
    dataset = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or calibration_dtype())
    info = {"protocol": P1.name, "windows": int(windows.shape[0]), "seqlen": P1.seqlen}
    if offset:
        info["first_window"] = offset
    return _Calibration(model, tok, dataset, "truncation", int(windows.shape[0]), P1.seqlen, info)


VLM_CALIBRATION_SAMPLES = 128
# 0 (triples only) by measurement: with 256 WikiText tokens after each triple the ~2-bit whole-VLM
# model kept its text (P1 235 vs 257,493) but lost its answers (P2 0.4225 vs 0.842; RESULTS 1b,
# 2026-12-02, chosen after seeing those P2 figures).
VLM_CALIBRATION_TEXT_TOKENS = 0


def _vlm_calibration(
    model_dir: Path,
    data,
    n: int | None,
    text_tokens: int | None = None,
    dtype: torch.dtype | None = None,
) -> _Calibration:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    text_tokens = VLM_CALIBRATION_TEXT_TOKENS if text_tokens is None else text_tokens
    if data is not None and not text_tokens:
        raise ValueError(
            "--data (WikiText-2) is read for VLMs only with --calibration-text-tokens N > 0; "
            "otherwise they calibrate on easy-VQA alone"
        )
    processor = AutoProcessor.from_pretrained(model_dir)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(
            f"the processor in {model_dir} has no chat template; VLM calibration formats each "
            "image-question-answer triple with it. Save the processor with a chat_template."
        )
    dataset, longest = easy_vqa_calibration(
        processor, _check_count(n, VLM_CALIBRATION_SAMPLES), text_tokens=text_tokens, data=data
    )
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=dtype or calibration_dtype()
    )
    text = f", each followed by {text_tokens} tokens of a P1 calibration window"
    info = {
        "data": "easy-VQA train, one triple per image (easy_vqa_calibration)"
        + (text if text_tokens else ""),
        "samples": len(dataset),
        "text_tokens_per_sample": text_tokens,
    }
    collate = functools.partial(collate_one, dtype=model.dtype)
    return _Calibration(model, processor, dataset, collate, len(dataset), longest, info)


def easy_vqa_calibration(
    processor, n: int = VLM_CALIBRATION_SAMPLES, text_tokens: int = 0, data=None
):
    """``n`` easy-VQA **train** image-question-answer triples, for ``oneshot``.

    One triple per image, for the first ``n`` train images in file order: image ``i`` with its
    question ``i mod (its question count)`` (so the vision tower sees ``n`` different images and
    every question form appears). Each triple is formatted with the processor's chat template
    (user: image + question; assistant: answer) and encoded by the processor, exactly as the
    model will see it.

    ``text_tokens > 0`` appends to sample ``i`` the first ``text_tokens`` tokens of P1
    calibration window ``i`` (WikiText-2 valid; never the test split): the language model's
    Hessians then cover plain text as well as image prompts, which keeps its text modelling (P1)
    from collapsing. Every sample keeps its image, so llm-compressor's traced pipeline sees one
    input signature.

    Returns:
        (dataset, max_seq_length): an HF ``Dataset`` of one encoded sample per row; pass it to
        ``oneshot(dataset=..., data_collator=collate_one, num_calibration_samples=n,
        max_seq_length=...)``.
    """
    from datasets import Dataset
    from tqdm.auto import tqdm

    from bivlm_plugin.eval.vqa_data import easy_vqa_by_image

    by_image = easy_vqa_by_image("train")
    if not 0 < n <= len(by_image):
        raise ValueError(f"n must be in 1..{len(by_image)} (easy-VQA train images), got {n}")
    picked = [qs[i % len(qs)] for i, qs in enumerate(list(by_image.values())[:n])]
    wiki = _text_windows(processor, n, text_tokens, data) if text_tokens else None
    rows = []
    for i, item in enumerate(tqdm(picked, desc="easy-VQA calibration", unit="sample")):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": item.question}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": item.answer}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        enc = dict(processor(text=text, images=[item.image()], return_tensors="pt"))
        if wiki is not None:
            extra = wiki[i : i + 1]
            enc["input_ids"] = torch.cat([enc["input_ids"], extra.to(enc["input_ids"])], dim=1)
            enc["attention_mask"] = torch.cat(
                [enc["attention_mask"], torch.ones_like(extra).to(enc["attention_mask"])], dim=1
            )
        rows.append({k: v.tolist() for k, v in enc.items()})
    longest = max(len(r["input_ids"][0]) for r in rows)
    return Dataset.from_list(rows), longest


def _text_windows(processor, n: int, text_tokens: int, data) -> torch.Tensor:
    from bivlm_plugin.eval.data import P1, p1_windows

    if not 0 < text_tokens <= P1.seqlen:
        raise ValueError(
            f"calibration text tokens must be in 1..{P1.seqlen} (a P1 window), got {text_tokens}"
        )
    windows = p1_windows(processor.tokenizer, "calib", data=data)
    if n > windows.shape[0]:
        raise ValueError(f"{n} samples need {n} P1 calibration windows, not {windows.shape[0]}")
    return windows[:n, :text_tokens]


def collate_one(batch: list[dict], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Batch size 1: samples are stored exactly as the processor returned them; floating
    tensors (pixel values) are cast to ``dtype``, the calibrated model's."""
    if len(batch) != 1:
        raise ValueError(f"VLM calibration runs with batch size 1, got {len(batch)}")
    out = {}
    for key, value in batch[0].items():
        t = torch.tensor(value)
        out[key] = t.to(dtype) if t.is_floating_point() else t
    return out


def calibration_dtype() -> torch.dtype:
    """The dtype a model is loaded in for calibration: bfloat16 where the CPU runs it natively
    (or on CUDA), else float32 (``utils.torch_dtype``: emulated bf16 is tens of times slower).
    The dense parts are saved in bfloat16 either way (``_save_atomically``): the sources are
    bf16 folders, so the float32 round trip of the layers left unquantized is exact."""
    return torch.bfloat16 if torch.cuda.is_available() else torch_dtype()


def calibration_torch_dtype(requested: str = "auto") -> torch.dtype:
    """``--calibration-dtype``: ``"auto"`` is :func:`calibration_dtype`; ``"bfloat16"`` or
    ``"float32"`` force it. Raises ValueError naming any other value."""
    if requested == "auto":
        return calibration_dtype()
    if requested not in ("bfloat16", "float32"):
        raise ValueError(
            f"calibration dtype {requested!r}: use one of ['auto', 'bfloat16', 'float32']"
        )
    return getattr(torch, requested)


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
        "fold_seconds": sum(s.get("fold_seconds", 0.0) for s in summaries),
        "layers": layers,
    }


def _save_atomically(
    model,
    tok,
    report: dict,
    output: Path,
    in_features: dict[str, int] | None = None,
    compressed: bool = False,
    pruning: dict[str, Any] | None = None,
) -> None:
    """Save into a temporary sibling; with packed layers, add bits measured on the files."""
    if model.dtype != torch.bfloat16:  # calibrated in float32 (calibration_dtype)
        model.to(torch.bfloat16)
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp, save_compressed=compressed)
        if not compressed and not in_features:
            _drop_quantization_config(tmp, report)
        if pruning:
            config = json.loads((tmp / "config.json").read_text())
            config[CONFIG_KEY] = pruning
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save_pretrained(tmp)
        if rewrite_checkpoint_keys(tmp):  # e.g. LLaVA: the key layout vLLM reads
            report["checkpoint_keys"] = "published layout (format/serving_keys.py)"
        if in_features:
            _add_file_bits(
                report,
                _file_bits_by_module(model, tmp, in_features),
                in_features,
                dense_bits=torch.finfo(model.dtype).bits,
            )
        elif compressed:
            report.update(compressed_tensors_file_bits(tmp))
        (tmp / "bivlm_report.json").write_text(json.dumps(report, indent=2) + "\n")


def _drop_quantization_config(folder: Path, report: dict) -> None:
    """A dense (``--fake-quant``) save holds the dequantized values themselves: its config must
    not carry llm-compressor's quantization_config, or transformers re-attaches quantization on
    load, with newly initialised scales for every module the saved ignore list misses (LLaVA's
    projector: P2 0 with P1 intact, 2026-12-02)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        report["note_dense"] = "dequantized weights saved dense; quantization_config dropped"


def _file_bits_by_module(model, folder: Path, in_features: dict[str, int]) -> dict[str, float]:
    """``storage_bits_from_files`` keyed by the model's module names.

    transformers may save under the original checkpoint names (LLaVA: ``language_model.model.*``
    for ``model.language_model.*``); its own load-time renaming maps them back.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    from bivlm_plugin.format.checkpoint import packed_modules_in_files

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    to_model = {}
    for key in packed_modules_in_files(sorted(folder.glob("*.safetensors"))):
        renamed, _ = rename_source_key(
            f"{key}.signs", renamings, converters, model.base_model_prefix, meta
        )
        to_model[key] = renamed.removesuffix(".signs")
    stored_in = {k: in_features[m] for k, m in to_model.items() if m in in_features}
    return {to_model[k]: b for k, b in storage_bits_from_files(folder, stored_in).items()}


def compressed_tensors_file_bits(folder: Path) -> dict[str, Any]:
    """Stored bits per weight of llm-compressor's packed layers (``pack-quantized``), from the
    safetensors files: every tensor saved under a module that has ``weight_packed`` (packed
    codes, scales, zero points, the shape record), bias excepted, over the weights it encodes."""
    from safetensors import safe_open

    from bivlm_plugin.format.checkpoint import read_safetensors_header

    sizes: dict[str, int] = {}
    shapes: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        header = read_safetensors_header(file)  # key -> (dtype, shape, bytes in the file)
        for key, (_, _, nbytes) in header.items():
            module, _, leaf = key.rpartition(".")
            if leaf != "bias":
                sizes[module] = sizes.get(module, 0) + nbytes
        with safe_open(str(file), "pt") as f:
            for key in header:
                if key.endswith(".weight_shape"):
                    record = f.get_tensor(key).tolist()
                    shapes[key.removesuffix(".weight_shape")] = math.prod(int(v) for v in record)
    packed = sorted(shapes)
    if not packed:
        return {"storage_bits_from_files": None}
    weights = sum(shapes[m] for m in packed)
    return {
        "packed_layers": len(packed),
        "storage_bits_from_files": sum(sizes[m] for m in packed) * 8 / weights,
    }


def _add_file_bits(
    report: dict, bits: dict[str, float], in_features: dict[str, int], dense_bits: int = 16
) -> None:
    """Per-layer and weighted-mean storage bits of the quantized layers, from the written files.

    A quantized layer that could not be packed (``attach_packed`` warned about it) is saved as
    its dense fake-quantized weight: it is charged ``dense_bits`` (the saved dtype's width), not
    the packed rate its codes would take, and listed under ``dense_layers``.
    """
    missing = sorted(set(in_features) - set(bits))
    if missing:
        raise RuntimeError(f"packed layers {missing[:5]} are missing from the saved files")
    total_w = total_b = 0.0
    dense = []
    for layer in report["layers"]:
        n = layer["shape"][0] * layer["shape"][1]
        if layer["name"] in bits:
            layer["storage_bits_from_files"] = bits[layer["name"]]
        else:
            layer["storage_bits_from_files"] = float(dense_bits)
            layer["kept_dense"] = True
            dense.append(layer["name"])
        total_w += n
        total_b += layer["storage_bits_from_files"] * n
    if dense:
        logger.warning(
            "%d quantized layers could not be packed and are saved dense at %d bits per weight "
            "(counted so in storage_bits_from_files): %s",
            len(dense),
            dense_bits,
            dense[:5],
        )
    report["packed_layers"] = len(bits)
    report["dense_layers"] = dense
    report["storage_bits_from_files"] = total_b / total_w if total_w else None
