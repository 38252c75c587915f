"""llm-compressor integration: ``BiVLMModifier`` and its registration with ModifierFactory."""

from __future__ import annotations

import sys

__all__ = ["register"]

_MODIFIER = "bivlm_plugin.integrations.llmcompressor.modifier"


def register() -> None:
    """Register our modifiers with llm-compressor's ModifierFactory (idempotent)."""
    partial = sys.modules.get(_MODIFIER)
    if partial is not None and not hasattr(partial, "register_modifiers"):
        # Our modifier module is mid-import (it imported llm-compressor, which triggered this
        # callback); it registers itself on its last line.
        return
    from bivlm_plugin.integrations.llmcompressor.modifier import register_modifiers

    register_modifiers()
