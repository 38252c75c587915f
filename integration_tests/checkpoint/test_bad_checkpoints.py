"""Corrupt bivlm-binary checkpoints fail in ``from_pretrained``, naming the tensor.

One tiny packed LLaMA is written per module (oneshot on two random windows, as in
``test_packed_checkpoint.py``); each case corrupts a copy of its ``model.safetensors`` (a packed
tensor dropped, given the wrong shape or dtype, or the file truncated) and checks that loading
raises a ValueError naming the checkpoint key, with the expected and the stored shape / dtype
where they differ. Nothing is returned half-loaded: the call raises before any weight is read.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

import bivlm_plugin  # noqa: E402,F401  (registers with llm-compressor / transformers / c-t)
from bivlm_plugin.format.checkpoint import read_safetensors_header  # noqa: E402

# Two rings so that ``rings`` is stored; p_sal 0.02 gives every layer salient weights
# (k = 1 at in_features 64, 3 at 160).
RECIPE = """
quant_stage:
  quant_modifiers:
    BiVLMModifier:
      targets: [Linear]
      ignore: [lm_head]
      p_sal: 0.02
      n_rings: 2
      refine_iters: 0
"""
M = "model.layers.1.mlp.down_proj"  # (64, 160): 5 sign words per row, k = 3, 2 rings
FILE = "model.safetensors"


@pytest.fixture(scope="module")
def packed_dir(tiny_llama_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from oneshot_helpers import oneshot_on_random_tokens

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    oneshot_on_random_tokens(model, tiny_tokenizer, RECIPE, 300, n=2, seqlen=16)
    out = tmp_path_factory.mktemp("packed_good")
    model.save_pretrained(out, save_compressed=True)
    header = read_safetensors_header(out / FILE)
    assert header[f"{M}.signs"][:2] == ("I32", [64, 5])
    assert header[f"{M}.rings"][:2] == ("I32", [64, 5])
    assert header[f"{M}.salient_idx"][:2] == ("U8", [64, 3])
    return out


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _corrupt(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / FILE)
    edit(tensors)
    save_file(tensors, dst / FILE, metadata={"format": "pt"})
    return dst


def _drop(name: str):
    return lambda t: t.pop(f"{M}.{name}")


def _set(name: str, fn):
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{M}.{name}"] = fn(t[f"{M}.{name}"]).contiguous()

    return edit


CASES = {
    # (a) a packed tensor missing
    "missing signs": (_drop("signs"), f"the checkpoint files hold no {M}.signs"),
    "missing scales": (_drop("scales"), f"{M}.scales missing from the checkpoint files"),
    "missing mean": (_drop("mean"), f"{M}.mean missing from the checkpoint files"),
    "missing rings": (_drop("rings"), f"{M}.rings missing from the checkpoint files"),
    "missing salient_sign2": (
        _drop("salient_sign2"),
        f"{M}.salient_sign2 missing from the checkpoint files while {M}.salient_idx, "
        f"{M}.salient_scales are stored",
    ),
    # (c) the wrong shape
    "signs one word short": (
        _set("signs", lambda x: x[:, :-1]),
        f"{M}.signs is stored as [64, 4] I32, expected [64, 5] I32",
    ),
    "mean one row short": (
        _set("mean", lambda x: x[:-1]),
        f"{M}.mean is stored as [63, 1] F16, expected [64, 1] F16",
    ),
    "salient_scales one column": (
        _set("salient_scales", lambda x: x[:, :1]),
        f"{M}.salient_scales is stored as [64, 1] F16, expected [64, 2] F16",
    ),
    "scales for four rings": (  # n_rings is read from scales: the message names both
        _set("scales", lambda x: torch.cat([x, x], dim=1)),
        f"{M}.rings is stored as [64, 5] I32, expected [64, 10] I32 for out_features=64 (the "
        f"model), in_features=160, n_rings=4 ({M}.scales [64, 4]), k=3",
    ),
    # (d) the wrong dtype
    "signs as int64": (
        _set("signs", lambda x: x.to(torch.int64)),
        f"{M}.signs is stored as [64, 5] I64, expected [64, 5] I32",
    ),
    "scales as float32": (
        _set("scales", lambda x: x.float()),
        f"{M}.scales is stored as [64, 2] F32, expected [64, 2] F16",
    ),
    "scales as bfloat16": (
        _set("scales", lambda x: x.bfloat16()),
        f"{M}.scales is stored as [64, 2] BF16, expected [64, 2] F16",
    ),
    "salient_idx as int16": (
        _set("salient_idx", lambda x: x.to(torch.int16)),
        f"{M}.salient_idx is stored as [64, 3] I16, expected [64, 3] U8",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_packed_tensor_fails_naming_it(packed_dir, tmp_path, case) -> None:
    edit, needle = CASES[case]
    bad = _corrupt(packed_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        _load(bad)
    fix = "incomplete or was written for another" if case == "missing signs" else "write it again"
    assert fix in str(err.value)  # says what to do


def test_truncated_file_fails_naming_the_tensors_cut_off(packed_dir, tmp_path) -> None:
    """An interrupted copy: the header is whole, the data stops 100 bytes short."""
    bad = tmp_path / "bad"
    shutil.copytree(packed_dir, bad)
    raw = (bad / FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = len(raw) - 8 - n
    header = json.loads(raw[8 : 8 + n])
    cut = sorted(
        k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > data - 100
    )
    assert cut  # the last tensor(s) in the file
    (bad / FILE).write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="is truncated") as err:
        _load(bad)
    msg = str(err.value)
    assert f"tensors cut off: {', '.join(cut)}" in msg and "download or save" in msg
    # Cut inside the header: nothing can be named but the file.
    (bad / FILE).write_bytes(raw[: n // 2])
    with pytest.raises(ValueError, match=rf"{FILE}: the safetensors header claims {n} bytes"):
        _load(bad)


def test_header_shape_that_disagrees_with_the_data_fails(packed_dir, tmp_path) -> None:
    """A hand-edited header: signs claims 4 words per row, its data span holds 5."""
    bad = tmp_path / "bad"
    shutil.copytree(packed_dir, bad)
    raw = bytearray((bad / FILE).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[f"{M}.signs"]["shape"] = [64, 4]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # same header length: the data offsets stay valid
    raw[8 : 8 + n] = text
    (bad / FILE).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(f"{M}.signs (I32 [64, 4] needs 1024 bytes")):
        _load(bad)


def test_untouched_copy_still_loads(packed_dir, tmp_path) -> None:
    """The checks reject nothing valid: a plain copy loads with its layers packed."""
    from bivlm_plugin.integrations.transformers.linear import BinaryLinear

    good = _corrupt(packed_dir, tmp_path / "good", lambda t: None)  # re-saved, unchanged
    model = _load(good)
    assert isinstance(model.get_submodule(M), BinaryLinear)
    assert model.get_submodule(M).rings.shape == (64, 5)
