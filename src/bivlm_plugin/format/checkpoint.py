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
import math
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
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Bytes per element of every safetensors dtype (to check a header's spans).
_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
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
    written. No tensor data is read, but the file is checked against its header: a header cut
    short, a file shorter than its tensors' spans (an interrupted download or copy) or a span
    that disagrees with its dtype and shape raise ValueError naming the file and the tensors.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "the file is truncated or corrupt: download or save the checkpoint again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header; {fix}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(
                f"{path}: the safetensors header claims {n} bytes but the file holds {size} "
                f"in all; {fix}"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{path}: the safetensors header is not valid JSON ({exc}); {fix}"
            ) from exc
    data = size - 8 - n
    out = {}
    cut, wrong = [], []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[key] = (info["dtype"], list(info["shape"]), end - start)
        if end > data:
            cut.append(key)
        item = _ST_ITEMSIZE.get(info["dtype"])
        if item is not None and end - start != item * math.prod(info["shape"]):
            wrong.append(
                f"{key} ({info['dtype']} {list(info['shape'])} needs "
                f"{item * math.prod(info['shape'])} bytes, its span has {end - start})"
            )
    if cut:
        raise ValueError(
            f"{path} is truncated: it holds {data} data bytes, its header needs "
            f"{max(header[k]['data_offsets'][1] for k in cut)}; tensors cut off: "
            f"{', '.join(sorted(cut))}; {fix}"
        )
    if wrong:
        raise ValueError(f"{path}: header spans disagree with dtype and shape: {'; '.join(wrong)}")
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
    entries: Mapping[str, tuple[str, list[int], int]],
    in_features: int,
    name: str = "?",
    out_features: int | None = None,
) -> BivlmLayout:
    """The layout of one stored module from its header entries and ``in_features``.

    The layout follows from the stored shapes (``BivlmLayout.from_packed``'s rules: rows from
    ``signs``, N from ``scales``, k from ``salient_idx``); every stored tensor is then checked
    against it. Raises ValueError naming the checkpoint key (``<name>.<tensor>``) of a missing
    tensor, or the expected and the stored shape / dtype of a wrong one.

    Args:
        entries: ``tensor name -> (safetensors dtype, shape, bytes)`` of the module.
        in_features: I of the model's layer (shapes only bound it).
        name: the module's key, for messages.
        out_features: O of the model's layer, when known (else the rows of ``signs``).
    """
    fix = (
        "the checkpoint is incomplete or corrupt: write it again (bivlm quantize, or "
        "save_pretrained(save_compressed=True) after oneshot)"
    )
    if "weight" in entries:
        raise ValueError(
            f"{name}.weight (a dense weight) is stored beside the packed {FORMAT_NAME} tensors "
            f"of {name}; {fix}"
        )
    missing = [t for t in ("signs", "scales", "mean") if t not in entries]
    if missing:
        raise ValueError(
            f"{', '.join(f'{name}.{t}' for t in missing)} missing from the checkpoint files: a "
            f"{FORMAT_NAME} layer always stores signs, scales and mean; {fix}"
        )
    trio = ("salient_idx", "salient_scales", "salient_sign2")
    stored = [t for t in trio if t in entries]
    if stored and len(stored) < len(trio):
        gone = [t for t in trio if t not in entries]
        raise ValueError(
            f"{', '.join(f'{name}.{t}' for t in gone)} missing from the checkpoint files while "
            f"{', '.join(f'{name}.{t}' for t in stored)} are stored (a layer with salient "
            f"weights stores all three); {fix}"
        )
    if "salient_count" in entries and not stored:
        raise ValueError(f"{name}.salient_count is stored without {name}.salient_idx; {fix}")
    shape = {t: list(e[1]) for t, e in entries.items()}
    ranks = {"signs": (2,), "scales": (1, 2), "mean": (2,), "salient_idx": (2,)}
    for t, allowed in ranks.items():
        if t in shape and len(shape[t]) not in allowed:
            raise ValueError(
                f"{name}.{t} is stored with shape {shape[t]}, a {'-D or '.join(map(str, allowed))}"
                f"-D tensor was expected; {fix}"
            )
    rows = shape["signs"][0] if out_features is None else out_features
    n_rings = shape["scales"][-1]
    try:
        layout = BivlmLayout(
            out_features=rows,
            in_features=in_features,
            n_rings=n_rings,
            k=shape["salient_idx"][1] if stored else 0,
            scale_mode="ring" if len(shape["scales"]) == 1 else "row_ring",
            mean_mode="row" if shape["mean"][1] == 1 else "row_subset",
            variable_k="salient_count" in entries,
        )
    except ValueError as exc:
        raise ValueError(
            f"{name}: stored tensors do not form a {FORMAT_NAME} layer ({name}.signs "
            f"{shape['signs']}, {name}.scales {shape['scales']}, in_features={in_features}): "
            f"{exc}; {fix}"
        ) from exc
    origin = (
        f"out_features={layout.out_features} "
        f"({'the model' if out_features is not None else f'rows of {name}.signs'}), "
        f"in_features={in_features}, n_rings={n_rings} ({name}.scales {shape['scales']}), "
        f"k={layout.k}"
    )
    specs = layout.specs()
    for t, spec in specs.items():
        want = (list(spec.shape), _ST_NAMES[spec.dtype])
        if t not in entries:  # only rings can be missing here: n_rings > 1 needs ring planes
            raise ValueError(
                f"{name}.{t} missing from the checkpoint files: expected {want[0]} {want[1]} "
                f"for {origin} (or {name}.scales is the corrupt one); {fix}"
            )
        got = (shape[t], entries[t][0])
        if got != want:
            raise ValueError(
                f"{name}.{t} is stored as {got[0]} {got[1]}, expected {want[0]} {want[1]} for "
                f"{origin}; {fix}"
            )
    extra = sorted(t for t in entries if t in PACKED_TENSORS and t not in specs)
    if extra:
        raise ValueError(
            f"{', '.join(f'{name}.{t}' for t in extra)} stored, but a layer with {origin} "
            f"stores no such tensor (or {name}.scales is the corrupt one); {fix}"
        )
    return layout


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
