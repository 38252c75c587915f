"""``BivlmBinaryCompressor``: compressed-tensors' compressor for the ``bivlm-binary`` format.

Registered with ``BaseCompressor.register(name="bivlm-binary")`` and reached by
compressed-tensors' own ``compress_module`` / ``decompress_module`` once the format member
exists (``seam.py``). It uses the classmethod interface of compressed-tensors 0.19:

- ``compress``: a Bi-VLM layer cannot be recovered from a dense weight (it needs the
  calibrated codes), so ``compress`` takes the layer's core ``BinaryCodes`` (``codes=``), and
  ``compress_module`` reads them from the module (``format.checkpoint.attached_codes``, put there
  by the llm-compressor modifier). The dense ``weight`` is replaced by the packed tensors of
  ``format.layout`` (names without prefix: ``signs``, ``scales``, ...); ``bias`` stays.
- ``decompress``: packed tensors -> dense ``weight`` (float32, exact dequantization).

``ModelCompressor.compress_model`` (llm-compressor's ``save_pretrained(save_compressed=True)``)
calls ``compress_module`` on every module whose scheme has ``format="bivlm-binary"``; the saved
state dict then holds ``<module>.signs`` etc. (``format/checkpoint.py``).

Non-goals: loading (transformers / vLLM integrations), kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict

from bivlm_plugin.core.binarize import dequantize
from bivlm_plugin.format.checkpoint import FORMAT_NAME, PACKED_TENSORS, attached_codes
from bivlm_plugin.format.codes import dequantize_packed, pack
from bivlm_plugin.format.layout import BivlmLayout

from .seam import check_version

__all__ = ["PACKED_NAMES", "BivlmBinaryCompressor"]

PACKED_NAMES = PACKED_TENSORS
# A fake-quantized bf16 weight differs from the codes' float32 dequantization by bf16 rounding.
_WEIGHT_RTOL = 2.0**-7


@BaseCompressor.register(name=FORMAT_NAME)
class BivlmBinaryCompressor(BaseCompressor):
    """Packs Bi-VLM layers into (and out of) the ``bivlm-binary`` tensors."""

    @classmethod
    def compression_param_names(cls, scheme: QuantizationScheme) -> tuple[str, ...]:
        return PACKED_NAMES

    @classmethod
    def can_compress(cls, module_type: type, scheme: QuantizationScheme) -> bool:
        # Opt-in only: a Bi-VLM layer is never inferred from a generic scheme.
        return issubclass(module_type, torch.nn.Linear) and scheme.format == FORMAT_NAME

    @classmethod
    def compress(
        cls, state_dict: dict[str, torch.Tensor], scheme: QuantizationScheme, codes: Any = None
    ) -> dict[str, torch.Tensor]:
        """``{"weight", ["bias"]}`` + the layer's codes -> ``{packed..., ["bias"]}``.

        Raises ValueError without codes, or when ``weight`` is not the codes' dequantization
        (the codes belong to another layer).
        """
        check_version()
        if codes is None:
            raise ValueError(
                f"{FORMAT_NAME} cannot compress a dense weight on its own: it needs the layer's "
                "calibrated Bi-VLM codes (quantize with BiVLMModifier, which attaches them)"
            )
        weight = state_dict.get("weight")
        if weight is not None:
            w_hat = dequantize(codes).to(weight.device)
            err = (weight.float() - w_hat).abs().max()
            if tuple(weight.shape) != tuple(w_hat.shape) or err > _WEIGHT_RTOL * (
                w_hat.abs().max() + 1e-12
            ):
                raise ValueError(
                    f"the module's weight {tuple(weight.shape)} is not the dequantization of its "
                    f"attached codes {tuple(w_hat.shape)} (max diff {float(err):.3g})"
                )
        out = {k: v for k, v in pack(codes).items()}
        if state_dict.get("bias") is not None:
            out["bias"] = state_dict["bias"]
        return out

    @classmethod
    def decompress(
        cls,
        state_dict: dict[str, torch.Tensor],
        scheme: QuantizationScheme,
        in_features: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{packed..., ["bias"]}`` -> ``{"weight" (float32), ["bias"]}``.

        Args:
            in_features: I of the layer; defaults to 32 x the words of ``signs`` (exact only
                when I is a multiple of 32).
        """
        check_version()
        packed = {k: v for k, v in state_dict.items() if k in PACKED_NAMES}
        if in_features is None:
            in_features = int(packed["signs"].shape[1]) * 32
        layout = BivlmLayout.from_packed(packed, in_features)
        out = {"weight": dequantize_packed(packed, layout)}
        if state_dict.get("bias") is not None:
            out["bias"] = state_dict["bias"]
        return out

    @classmethod
    def compress_module(cls, module: torch.nn.Module) -> None:
        scheme = module.quantization_scheme
        state = get_direct_state_dict(module)
        new = cls.compress(state, scheme, codes=attached_codes(module))
        replace_direct_state_dict(module, new)
        module.quantization_status = QuantizationStatus.COMPRESSED

    @classmethod
    def decompress_module(cls, module: torch.nn.Module) -> None:
        scheme = module.quantization_scheme
        state = get_direct_state_dict(module)
        new = cls.decompress(state, scheme, in_features=getattr(module, "in_features", None))
        replace_direct_state_dict(module, new)
        module.quantization_status = QuantizationStatus.DECOMPRESSED
