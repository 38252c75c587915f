"""The one explicit seam around compressed-tensors' closed ``CompressionFormat`` enum.

Design (why it looks like this):

- **Checkpoints never depend on the enum.** A packed Bi-VLM checkpoint names its format at the
  top level of ``quantization_config`` (``quant_method: "bivlm"``, ``format: "bivlm-binary"``;
  ``format/checkpoint.py``). transformers and vLLM dispatch on ``quant_method`` through their
  own registries, so no reader needs ``"bivlm-binary"`` to be a ``CompressionFormat`` value,
  and no compressed-tensors version can misread or reject our files.
- **In-process compressed-tensors APIs need a member.** ``compress_module`` /
  ``decompress_module`` / ``ModelCompressor`` look compressors up through
  ``CompressionFormat(scheme.format)``, and ``QuantizationScheme.format`` is typed by that enum.
  To let them reach ``BivlmBinaryCompressor`` we add one member, ``bivlm_binary =
  "bivlm-binary"``, and nothing else: no compressed-tensors function is patched.
- **Guarded.** The member is added only on compressed-tensors versions this was tested on
  (``SUPPORTED``) and only when the enum still has the shape relied on (a ``str`` Enum with
  ``_member_map_`` / ``_value2member_map_`` / ``_member_names_``). Anything else raises
  ``UnsupportedCompressedTensorsError`` naming the version found, the supported range and the
  fix. Adding it twice is a no-op.

``import bivlm_plugin`` calls ``register()`` (in ``__init__.py``) when compressed-tensors is
imported; on an unsupported version it logs the message and registers nothing, so imports never
crash; the compressor's entry points raise the same message when used.
"""

from __future__ import annotations

import enum

from bivlm_plugin.format.checkpoint import FORMAT_NAME

__all__ = [
    "MEMBER_NAME",
    "SUPPORTED",
    "UnsupportedCompressedTensorsError",
    "bivlm_compression_format",
    "check_version",
    "installed_version",
]

MEMBER_NAME = "bivlm_binary"
# Tested range: the enum layout and the compressor interface (classmethod compress /
# decompress, BaseCompressor.register) are those of 0.19.x.
SUPPORTED = (">=0.19", "<0.20")


class UnsupportedCompressedTensorsError(RuntimeError):
    """The installed compressed-tensors cannot host the ``bivlm-binary`` compressor."""


def installed_version() -> str:
    import compressed_tensors

    return str(getattr(compressed_tensors, "__version__", "unknown"))


def _supported(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(",".join(SUPPORTED))
    except InvalidVersion:
        return False


def _message(version: str, reason: str) -> str:
    return (
        f"compressed-tensors {version} is not supported by bivlm-plugin's {FORMAT_NAME!r} "
        f"compressor ({reason}; supported: compressed-tensors {','.join(SUPPORTED)}). Install "
        "it with `pip install 'compressed-tensors>=0.19,<0.20'` (or "
        "`pip install 'bivlm-plugin[llmcompressor]'`). Packed checkpoints do not need it: "
        "`bivlm quantize` and model.save_pretrained write them, and transformers / vLLM load "
        "them, through quant_method='bivlm'."
    )


def check_version(version: str | None = None) -> None:
    """Raise ``UnsupportedCompressedTensorsError`` unless ``version`` (default: installed) fits."""
    version = installed_version() if version is None else version
    if not _supported(version):
        raise UnsupportedCompressedTensorsError(_message(version, "untested version"))


def bivlm_compression_format() -> enum.Enum:
    """The ``CompressionFormat`` member for ``"bivlm-binary"``, added on first use (guarded)."""
    check_version()
    from compressed_tensors.config import CompressionFormat as CF

    existing = CF._value2member_map_.get(FORMAT_NAME)
    if existing is not None:
        return existing
    shape_ok = (
        issubclass(CF, str)
        and issubclass(CF, enum.Enum)
        and isinstance(getattr(CF, "_member_map_", None), dict)
        and isinstance(getattr(CF, "_value2member_map_", None), dict)
        and isinstance(getattr(CF, "_member_names_", None), list)
        and MEMBER_NAME not in CF._member_map_
    )
    if not shape_ok:
        raise UnsupportedCompressedTensorsError(
            _message(installed_version(), "CompressionFormat is not the str Enum it used to be")
        )
    member = str.__new__(CF, FORMAT_NAME)
    member._name_ = MEMBER_NAME
    member._value_ = FORMAT_NAME
    member.__objclass__ = CF
    member._sort_order_ = len(CF._member_names_)
    CF._member_map_[MEMBER_NAME] = member
    CF._value2member_map_[FORMAT_NAME] = member
    CF._member_names_.append(MEMBER_NAME)
    return member
