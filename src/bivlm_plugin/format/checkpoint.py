"""The packed checkpoint schema every integration reads and writes (see ``docs/FORMAT.md``).

A packed Bi-VLM checkpoint is a Hugging Face folder written through compressed-tensors (llm-
compressor's ``save_pretrained``). Its ``config.json`` ``quantization_config`` is a
compressed-tensors config whose **top-level ``format`` is ``"bivlm-binary"``** (that key is what
our loaders claim a checkpoint by: ``is_bivlm_config``), with one config group whose ``format``
is ``"bivlm-binary"`` and whose ``targets`` are the packed modules' names.

For each packed module the files hold the tensors of its ``BivlmLayout`` as
``<module name>.<tensor name>`` (``signs``, ``rings``, ``scales``, ``mean``, ``salient_idx``,
``salient_scales``, ``salient_sign2``, ``salient_count``), plus ``<module name>.bias`` when the
linear has one, and no ``<module name>.weight``. The layout of a module follows from those
shapes and the module's ``in_features`` (``BivlmLayout.from_packed``), so the config repeats no
shape. Everything else is dense, as transformers saves it.

Hand-off between the quantizer and the writers: the llm-compressor modifier attaches each
layer's core ``BinaryCodes`` to its module with ``attach_codes``; the compressor reads them back
with ``attached_codes``. Only this module knows the attribute name.

Non-goals: the tensor layout itself (``layout.py``), framework objects (integrations).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .layout import BivlmLayout

__all__ = [
    "FORMAT_NAME",
    "PACKED_TENSORS",
    "attach_codes",
    "attached_codes",
    "detach_codes",
    "is_bivlm_config",
    "layout_from_header",
    "packed_modules_in_files",
    "read_safetensors_header",
    "storage_bits_from_files",
    "tensor_names",
]

FORMAT_NAME = "bivlm-binary"
# Every tensor name a layout can hold (``BivlmLayout.specs``), in storage order.
PACKED_TENSORS = (
    "signs",
    "rings",
    "scales",
    "mean",
    "salient_idx",
    "salient_scales",
    "salient_sign2",
    "salient_count",
)
_CODES_ATTR = "_bivlm_codes"
_ST_DTYPES = {
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
}


def is_bivlm_config(config: Mapping[str, Any] | None) -> bool:
    """Whether a ``quantization_config`` dict describes a packed Bi-VLM checkpoint."""
    return isinstance(config, Mapping) and config.get("format") == FORMAT_NAME


def tensor_names(name: str, layout: BivlmLayout, bias: bool = False) -> list[str]:
    """Checkpoint keys of one packed module, in storage order."""
    return [f"{name}.{t}" for t in layout.specs()] + ([f"{name}.bias"] if bias else [])


# ---------------------------------------------------------------------------------- hand-off
def attach_codes(module: torch.nn.Module, codes: Any) -> None:
    """Remember a layer's core ``BinaryCodes`` on its module (a plain attribute, not state)."""
    object.__setattr__(module, _CODES_ATTR, codes)


def attached_codes(module: torch.nn.Module) -> Any | None:
    """The codes ``attach_codes`` stored on ``module``, or None."""
    return module.__dict__.get(_CODES_ATTR)


def detach_codes(module: torch.nn.Module) -> None:
    module.__dict__.pop(_CODES_ATTR, None)


# ------------------------------------------------------------------------------ file headers
def read_safetensors_header(path: str | Path) -> dict[str, tuple[str, list[int], int]]:
    """``key -> (dtype, shape, bytes)`` of every tensor of a safetensors file, from its header.

    The byte count is the tensor's span in the file (``data_offsets``): what is actually
    written. No tensor data is read.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[key] = (info["dtype"], list(info["shape"]), end - start)
    return out


def packed_modules_in_files(
    files: Iterable[str | Path],
) -> dict[str, dict[str, tuple[str, list[int], int]]]:
    """``module key -> {tensor name: (dtype, shape, bytes)}`` for every packed module stored.

    A module is packed when ``<key>.signs`` is stored; its entries are the ``PACKED_TENSORS``
    stored under the same prefix (and ``bias`` when present).
    """
    tensors: dict[str, tuple[str, list[int], int]] = {}
    for path in files:
        tensors.update(read_safetensors_header(path))
    out: dict[str, dict[str, tuple[str, list[int], int]]] = {}
    for key in tensors:
        if key.endswith(".signs"):
            prefix = key[: -len(".signs")]
            out[prefix] = {
                t: tensors[f"{prefix}.{t}"]
                for t in (*PACKED_TENSORS, "bias", "weight")
                if f"{prefix}.{t}" in tensors
            }
    return out


def layout_from_header(
    entries: Mapping[str, tuple[str, list[int], int]], in_features: int, name: str = "?"
) -> BivlmLayout:
    """The layout of one stored module from its header entries and ``in_features``."""
    if "weight" in entries:
        raise ValueError(f"{name}: a dense weight is stored beside the packed tensors")
    meta = {}
    for t, (dtype, shape, _) in entries.items():
        if t in PACKED_TENSORS:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}.{t}: unexpected stored dtype {dtype}")
            meta[t] = torch.empty(shape, dtype=_ST_DTYPES[dtype], device="meta")
    try:
        return BivlmLayout.from_packed(meta, in_features)
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"{name}: stored tensors do not form a {FORMAT_NAME} layer: {exc}"
        ) from exc


def storage_bits_from_files(
    folder: str | Path, in_features: Mapping[str, int] | None = None
) -> dict[str, float]:
    """Stored bits per weight of every packed module in ``folder``'s safetensors files.

    Counts every tensor saved for the module except its (dense, optional) bias, so it equals
    ``format.storage_bits`` on the same tensors.

    Args:
        folder: the checkpoint folder.
        in_features: ``module key -> I``; by default I = 32 x the words of ``signs`` (exact
            when I is a multiple of 32).

    Returns:
        ``module key -> bits per weight``.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    out = {}
    for key, entries in packed_modules_in_files(files).items():
        i = (in_features or {}).get(key, entries["signs"][1][1] * 32)
        layout = layout_from_header(entries, i, key)
        total = sum(entries[t][2] for t in layout.specs())
        out[key] = total * 8 / (layout.out_features * layout.in_features)
    return out
