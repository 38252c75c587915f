"""Import every built-in layer quantizer so that it registers itself."""

from __future__ import annotations

__all__ = ["load_all"]


def load_all() -> None:
    """Register Bi-VLM and the baselines (idempotent)."""
    from bivlm_plugin.core import baselines, bivlm  # noqa: F401
