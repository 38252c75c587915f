"""compressed-tensors integration: the ``bivlm-binary`` compressor and the enum seam.

``register()`` runs when compressed-tensors is imported (``import bivlm_plugin`` arranges it):
it registers ``BivlmBinaryCompressor`` with ``BaseCompressor`` and adds the ``bivlm-binary``
member to ``CompressionFormat`` (``seam.py`` explains the design). Idempotent. On an
unsupported compressed-tensors version it logs why and registers nothing.
"""

from __future__ import annotations

import logging

__all__ = ["register"]

logger = logging.getLogger(__name__)


def register() -> bool:
    """Register the compressor and the format member; False (with a warning) when unsupported."""
    from .seam import UnsupportedCompressedTensorsError, bivlm_compression_format, check_version

    try:
        check_version()
    except UnsupportedCompressedTensorsError as exc:
        logger.warning("%s", exc)
        return False
    from . import compressor  # noqa: F401  (the decorator registers it)

    bivlm_compression_format()
    return True
