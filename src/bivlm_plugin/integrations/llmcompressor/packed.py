"""Hand the modifier's codes to compressed-tensors so saving writes the packed format.

After ``oneshot``, each packable quantized linear gets (``attach_packed``):

- its core ``BinaryCodes`` (``format.checkpoint.attach_codes``), and
- a compressed-tensors ``QuantizationScheme`` with ``format="bivlm-binary"`` (one scheme shared by
  all of them, ``targets`` = their names) and status ``FROZEN``,

exactly as llm-compressor's own modifiers leave their modules. Then llm-compressor's
``model.save_pretrained(dir, save_compressed=True)`` does the rest through compressed-tensors:
``ModelCompressor`` finds the registered ``bivlm-binary`` compressor, which swaps each weight for
its packed tensors, and ``config.json`` gets a ``quantization_config`` whose ``format`` is
``bivlm-binary``. ``detach_packed`` undoes it (for a fake-quantized bf16 save).

Layers whose codes cannot be packed (variable-k salient layouts from
``salient_select="threshold"``, parameters that are not fp16 values, or baselines without codes)
keep their fake-quantized weight, with a warning naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from bivlm_plugin.format.checkpoint import FORMAT_NAME, attach_codes, attached_codes, detach_codes
from bivlm_plugin.format.codes import pack

__all__ = ["attach_packed", "detach_packed", "packed_modules"]

logger = logging.getLogger(__name__)


def _require_compressor() -> None:
    from compressed_tensors.compressors import BaseCompressor

    try:
        BaseCompressor.get_value_from_registry(FORMAT_NAME)
    except (KeyError, ValueError) as exc:
        import compressed_tensors

        raise RuntimeError(
            f"the {FORMAT_NAME!r} compressor is not registered with compressed-tensors "
            f"{compressed_tensors.__version__} (import bivlm_plugin first; on an unsupported "
            "compressed-tensors version its import logs why). Save with fake_quant / "
            "`bivlm quantize --fake-quant`, or install compressed-tensors>=0.19,<0.20"
        ) from exc


def attach_packed(model: torch.nn.Module, codes: Mapping[str, Any]) -> list[str]:
    """Prepare ``model`` so a compressed save writes ``codes`` (``name -> BinaryCodes``) packed.

    Returns:
        The names of the modules that will be saved packed.
    """
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStatus,
    )

    packable, skipped = {}, []
    for name, c in codes.items():
        try:
            pack(c)  # fails for variable-k layouts and non-fp16 parameters
        except ValueError as exc:
            skipped.append(name)
            logger.warning("%s stays fake-quantized (dense): %s", name, exc)
            continue
        packable[name] = c
    if not packable:
        return []
    _require_compressor()
    scheme = QuantizationScheme(
        targets=sorted(packable),
        # Descriptive only (vLLM / tools read it): one sign bit plane, per-row scale and mean.
        weights=QuantizationArgs(num_bits=1, type="int", symmetric=False, strategy="channel"),
        format=FORMAT_NAME,
    )
    for name, c in packable.items():
        module = model.get_submodule(name)
        attach_codes(module, c)
        module.quantization_scheme = scheme
        module.quantization_status = QuantizationStatus.FROZEN
    return sorted(packable)


def detach_packed(model: torch.nn.Module) -> None:
    """Undo ``attach_packed``: a later save writes the fake-quantized dense weights."""
    for module in model.modules():
        if attached_codes(module) is None:
            continue
        detach_codes(module)
        for attr in ("quantization_scheme", "quantization_status"):
            if hasattr(module, attr):
                delattr(module, attr)


def packed_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules ``attach_packed`` prepared."""
    return [n for n, m in model.named_modules() if attached_codes(m) is not None]
