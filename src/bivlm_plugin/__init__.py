"""bivlm-plugin: Bi-VLM ultra-low-bit post-training quantization for VLMs.

Importing the package does only what a plugin exists for: it registers ``BiVLMModifier`` with
llm-compressor's ``ModifierFactory`` as soon as llm-compressor is imported (at once if it already
is; see ``_lazy.py``), so recipes that name it work with ``oneshot``. No global torch flags, no
device initialization, no downloads.
"""

from __future__ import annotations

import logging

from bivlm_plugin._lazy import when_imported

__version__ = "0.1.0.dev0"

logger = logging.getLogger(__name__)


def _register_llmcompressor() -> None:
    from bivlm_plugin.integrations.llmcompressor import register

    register()


when_imported("llmcompressor", _register_llmcompressor)
