"""``BiVLMHfQuantizer``: ``from_pretrained`` of packed Bi-VLM checkpoints, weights kept packed.

Before any weight is read, every module the config targets is replaced on the meta device by an
empty ``BinaryLinear`` whose buffers have the stored packed shapes and dtypes (read from the
safetensors headers: no tensor data); transformers then fills those buffers straight from the
files. No dense weight of a quantized layer is ever created.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from bivlm_plugin.format.checkpoint import layout_from_header, packed_modules_in_files

from .config import BiVLMConfig
from .linear import BinaryLinear, replace_with_binary_linear

__all__ = ["BiVLMHfQuantizer"]

logger = logging.getLogger(__name__)


class BiVLMHfQuantizer(HfQuantizer):
    """Loads Bi-VLM checkpoints with the weights kept packed (``BinaryLinear``)."""

    requires_calibration = True  # quantizing happens in llm-compressor, never at load time
    quantization_config: BiVLMConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError(
                "packed Bi-VLM layers cannot be offloaded to disk; load without a disk device_map"
            )

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        files = kwargs.get("checkpoint_files") or []
        stored = _as_model_names(
            model, packed_modules_in_files(f for f in files if str(f).endswith(".safetensors"))
        )
        modules = {}
        for name in self.quantization_config.targets:
            if name not in stored:
                raise ValueError(
                    f"quantization_config targets {name!r} but the checkpoint files hold no "
                    f"{name}.signs (files: {[str(f) for f in files]}); the checkpoint is "
                    "incomplete or was written for another architecture"
                )
            try:
                linear = model.get_submodule(name)
                in_features, out_features = linear.in_features, linear.out_features
            except AttributeError as exc:
                raise ValueError(
                    f"quantization_config targets {name!r}, which the model has no linear for"
                ) from exc
            key, entries = stored[name]  # key: the module's name in the files
            # Every packed tensor is checked (names, shapes, dtypes) before any is loaded, so a
            # corrupt checkpoint fails here naming the tensor, never half-loaded.
            layout = layout_from_header(entries, in_features, key, out_features)
            modules[name] = (layout, "bias" in entries)
        replaced = replace_with_binary_linear(
            model, modules, bias_dtype=kwargs.get("dtype") or getattr(model, "dtype", None)
        )
        logger.info("bivlm: %d linears kept packed as BinaryLinear", len(replaced))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        # transformers keeps the checkpoint's dtype for every key it renames while loading a
        # pre-quantized model (core_model_loading: "deserializing"), and VLM checkpoints are
        # renamed wholesale (published layout -> transformers 5 modules): without this a
        # bf16-saved Qwen2-VL loaded with dtype=torch.float32 keeps bf16 dense layers next to
        # float32 activations. Packed buffers keep their stored integer / fp16 dtypes.
        target = getattr(model.config, "dtype", None)  # the dtype from_pretrained settled on
        if isinstance(target, torch.dtype):
            keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
            for name, module in model.named_modules():
                if any(k in name for k in keep):
                    continue
                for pname, param in module.named_parameters(recurse=False):
                    if isinstance(module, BinaryLinear) and pname != "bias":
                        continue  # packed tensors keep their stored dtypes
                    if param.is_floating_point() and param.dtype != target:
                        param.data = param.data.to(target)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _as_model_names(model, stored: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Re-key stored modules by the model's module names: ``name -> (key in the files, entries)``.

    transformers saves some models (LLaVA, ...) under their original checkpoint names
    (``language_model.model.layers...``) and renames keys while loading; apply the same renaming
    transformers will apply (its conversion mapping for this model), so the packed modules are
    found under the names ``named_modules()`` gives.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for key, entries in stored.items():
        renamed, _ = rename_source_key(
            f"{key}.signs", renamings, converters, model.base_model_prefix, meta
        )
        out[renamed.removesuffix(".signs")] = (key, entries)
    return out
