"""``BiVLMConfig``: the transformers quantization config of packed Bi-VLM checkpoints.

A packed checkpoint's ``quantization_config`` is a compressed-tensors config whose top-level
``format`` is ``"bivlm-binary"`` (``format/checkpoint.py``). transformers dispatches on
``quant_method`` (``"compressed-tensors"`` there), so ``register()`` (``__init__.py``) puts a
thin ``CompressedTensorsConfig`` subclass in front of that entry whose ``from_dict`` returns a
``BiVLMConfig`` for bivlm-binary configs and defers to compressed-tensors for all others.
``BiVLMConfig.quant_method`` is ``"bivlm"``, under which ``BiVLMHfQuantizer`` is registered;
``to_dict`` gives back the stored dict unchanged, so a re-saved model keeps its config.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from transformers.utils.quantization_config import (
    CompressedTensorsConfig,
    QuantizationConfigMixin,
)

from bivlm_plugin.format.checkpoint import FORMAT_NAME, is_bivlm_config

__all__ = ["QUANT_METHOD", "BiVLMConfig", "BivlmAwareCompressedTensorsConfig"]

QUANT_METHOD = "bivlm"


class BiVLMConfig(QuantizationConfigMixin):
    """The stored ``quantization_config`` of a packed Bi-VLM checkpoint.

    Args:
        stored: the dict from ``config.json`` (must have ``format == "bivlm-binary"``).
    """

    def __init__(self, stored: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        stored = dict(stored if stored is not None else kwargs)
        if not is_bivlm_config(stored):
            raise ValueError(
                f"quantization_config.format is {stored.get('format')!r}, expected "
                f"{FORMAT_NAME!r}: not a packed Bi-VLM checkpoint"
            )
        self.stored = stored
        self.quant_method = QUANT_METHOD

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(dict(config_dict))
        return (config, kwargs) if return_unused_kwargs else config

    @property
    def targets(self) -> list[str]:
        """Names of the packed modules (the config groups' targets)."""
        groups = self.stored.get("config_groups") or {}
        return sorted(
            {t for g in groups.values() if g.get("format") == FORMAT_NAME for t in g["targets"]}
        )

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.stored)

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class BivlmAwareCompressedTensorsConfig(CompressedTensorsConfig):
    """transformers' compressed-tensors config entry, routing bivlm-binary configs to us."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        if is_bivlm_config(config_dict):
            return BiVLMConfig.from_dict(config_dict, return_unused_kwargs, **kwargs)
        return CompressedTensorsConfig.from_dict.__func__(
            CompressedTensorsConfig, config_dict, return_unused_kwargs, **kwargs
        )
