"""llm-compressor integration: ``BiVLMModifier`` and its registration with ModifierFactory."""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register our modifiers with llm-compressor's ModifierFactory (idempotent)."""
    from bivlm_plugin.integrations.llmcompressor.modifier import register_modifiers

    register_modifiers()
