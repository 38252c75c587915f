"""transformers integration: ``BinaryLinear``, ``BiVLMConfig`` and ``BiVLMHfQuantizer``.

``register()`` (``import bivlm_plugin`` calls it once transformers is imported):

- registers ``BiVLMConfig`` / ``BiVLMHfQuantizer`` under ``quant_method="bivlm"``;
- puts ``BivlmAwareCompressedTensorsConfig`` in front of the ``"compressed-tensors"`` config
  entry, so stored configs whose ``format`` is ``"bivlm-binary"`` become a ``BiVLMConfig`` (and
  thus our quantizer) while every other compressed-tensors checkpoint loads as before.

transformers raises on a duplicate registration, so ``register`` checks first: calling it any
number of times, in any import order, is harmless.
"""

from __future__ import annotations

__all__ = ["register"]

_CT = "compressed-tensors"


def register() -> None:
    """Register with transformers' quantization registries (idempotent)."""
    from transformers.quantizers import auto
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from .config import QUANT_METHOD, BivlmAwareCompressedTensorsConfig, BiVLMConfig
    from .quantizer import BiVLMHfQuantizer

    for mapping, cls, register_fn in (
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, BiVLMConfig, auto.register_quantization_config),
        (auto.AUTO_QUANTIZER_MAPPING, BiVLMHfQuantizer, auto.register_quantizer),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is None:
            register_fn(QUANT_METHOD)(cls)
        elif current.__qualname__ != cls.__qualname__:
            raise RuntimeError(
                f"transformers already has {current.__module__}.{current.__qualname__} "
                f"registered for quant_method={QUANT_METHOD!r}; another package claims the name"
            )
    current = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(_CT)
    if current is CompressedTensorsConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[_CT] = BivlmAwareCompressedTensorsConfig
    elif current is None or current.__qualname__ != BivlmAwareCompressedTensorsConfig.__qualname__:
        raise RuntimeError(
            f"transformers' {_CT!r} config entry is {current!r}, not CompressedTensorsConfig; "
            "bivlm-plugin cannot route bivlm-binary checkpoints (another plugin replaced it)"
        )
