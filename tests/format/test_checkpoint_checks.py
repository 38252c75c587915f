"""Header checks of packed checkpoint files, without a model (``format/checkpoint.py``).

``integration_tests/checkpoint/test_bad_checkpoints.py`` runs the same corruptions through
transformers' ``from_pretrained``; these need only safetensors.
"""

from __future__ import annotations

import re

import pytest
import torch

from bivlm_plugin.format import layout_of, pack
from bivlm_plugin.format.checkpoint import layout_from_header, packed_modules_in_files
from bivlm_plugin.format.synthetic import random_codes

safetensors_torch = pytest.importorskip("safetensors.torch")

M = "layer"


def _write(tmp_path, tensors: dict[str, torch.Tensor]):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({f"{M}.{k}": v.contiguous() for k, v in tensors.items()}, path)
    return path


@pytest.fixture
def packed():
    codes = random_codes(6, 45, n_rings=2, k=3, seed=0)  # 2 words per row, uint8 indices
    return pack(codes), layout_of(codes)


def test_a_good_module_gives_its_layout(packed, tmp_path) -> None:
    tensors, layout = packed
    entries = packed_modules_in_files([_write(tmp_path, tensors)])[M]
    assert layout_from_header(entries, 45, M) == layout
    assert layout_from_header(entries, 45, M, out_features=6) == layout


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.pop("mean"), f"{M}.mean missing from the checkpoint files"),
        (lambda t: t.pop("rings"), f"{M}.rings missing from the checkpoint files"),
        (lambda t: t.pop("salient_scales"), f"{M}.salient_scales missing"),
        (
            lambda t: t.update(signs=t["signs"][:, :1]),
            f"{M}.signs is stored as [6, 1] I32, expected [6, 2] I32",
        ),
        (
            lambda t: t.update(scales=t["scales"].float()),
            f"{M}.scales is stored as [6, 2] F32, expected [6, 2] F16",
        ),
        (
            lambda t: t.update(weight=torch.zeros(6, 45)),
            f"{M}.weight (a dense weight) is stored beside",
        ),
    ],
    ids=["missing mean", "missing rings", "missing salient_scales", "shape", "dtype", "dense"],
)
def test_a_bad_module_names_the_key(packed, tmp_path, edit, needle) -> None:
    tensors = dict(packed[0])
    edit(tensors)
    entries = packed_modules_in_files([_write(tmp_path, tensors)])[M]
    with pytest.raises(ValueError, match=re.escape(needle)):
        layout_from_header(entries, 45, M, out_features=6)


def test_truncated_file_names_the_tensors_cut_off(packed, tmp_path) -> None:
    path = _write(tmp_path, packed[0])
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])  # the last byte of the last tensor in the file
    with pytest.raises(ValueError, match=r"is truncated: .* tensors cut off: layer\.\w+;"):
        packed_modules_in_files([path])
    path.write_bytes(raw[:5])
    with pytest.raises(ValueError, match="too short for a safetensors header"):
        packed_modules_in_files([path])
