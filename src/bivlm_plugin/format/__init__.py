"""On-disk / in-memory packed layout of Bi-VLM layers: one ``BivlmLayout`` all integrations
build from, the bit packing math, and exact conversion from / to core's ``BinaryCodes``."""

from __future__ import annotations

from .codes import dequantize_packed, layout_of, pack, storage_bits, unpack
from .layout import BivlmLayout, TensorSpec, fuse_rows, shard_columns, shard_rows
from .pack import n_words, pack_bits, unpack_bits

__all__ = [
    "BivlmLayout",
    "TensorSpec",
    "dequantize_packed",
    "fuse_rows",
    "layout_of",
    "n_words",
    "pack",
    "pack_bits",
    "shard_columns",
    "shard_rows",
    "storage_bits",
    "unpack",
    "unpack_bits",
]
