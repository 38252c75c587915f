"""bivlm-plugin: Bi-VLM ultra-low-bit post-training quantization for VLMs.

Importing the package does only what a plugin exists for, each as soon as the framework is
imported (at once if it already is; see ``_lazy.py``):

- llm-compressor: ``BiVLMModifier`` with ``ModifierFactory``, so recipes that name it work;
- transformers: ``BiVLMConfig`` / ``BiVLMHfQuantizer`` under ``quant_method="bivlm"``, so
  ``from_pretrained`` loads packed checkpoints with the weights kept packed;
- compressed-tensors: the ``bivlm-binary`` compressor and its ``CompressionFormat`` member.

No global torch flags, no device initialization, no downloads.
"""

from __future__ import annotations

import logging

from bivlm_plugin._lazy import when_imported

__version__ = "0.1.0.dev0"

logger = logging.getLogger(__name__)


def _register_llmcompressor() -> None:
    from bivlm_plugin.integrations.llmcompressor import register

    register()


def _register_transformers() -> None:
    from bivlm_plugin.integrations.transformers import register

    register()


def _register_compressed_tensors() -> None:
    from bivlm_plugin.integrations.compressed_tensors import register

    register()


when_imported("transformers", _register_transformers)
when_imported("compressed_tensors", _register_compressed_tensors)
when_imported("llmcompressor", _register_llmcompressor)
