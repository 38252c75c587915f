"""The compute dtype follows the CPU: bfloat16 only where it runs natively.

On an AVX2-only CPU torch emulates bf16 matmuls (measured tens of times slower than float32),
so ``--dtype auto`` (every command's default) resolves to float32 there: in ``vllm serve``'s
command line, ``bivlm eval vqa`` and calibration.
"""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin import utils
from bivlm_plugin.app import serve
from bivlm_plugin.app.quantize import calibration_dtype, collate_one


@pytest.mark.parametrize("fast, want", [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_cpu(monkeypatch, fast, want) -> None:
    monkeypatch.setattr(utils, "fast_bf16", lambda: fast)
    assert utils.compute_dtype("auto") == want
    assert utils.compute_dtype("bfloat16") == "bfloat16"  # an explicit choice is kept
    assert utils.compute_dtype("float32") == "float32"
    cmd = serve.server_command("/m", 8000)
    assert cmd[cmd.index("--dtype") + 1] == want
    cmd = serve.server_command("/m", 8000, dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"


@pytest.mark.parametrize("fast, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_calibration_dtype_follows_the_cpu(monkeypatch, fast, want) -> None:
    monkeypatch.setattr(utils, "fast_bf16", lambda: fast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert calibration_dtype() == want


def test_bad_dtype_names_the_value_and_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"dtype 'fp8': use one of \['auto', 'bfloat16', 'float32'\]"
    ):
        utils.compute_dtype("fp8")


def test_fast_bf16_matches_torch_and_is_recorded() -> None:
    assert utils.fast_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    env = utils.environment_info()
    assert env["fast_bf16"] == utils.fast_bf16()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_collate_casts_pixels_to_the_models_dtype() -> None:
    sample = {"input_ids": [[1, 2, 3]], "pixel_values": [[[0.5, 0.25]]]}
    for dtype in (torch.bfloat16, torch.float32):
        out = collate_one([sample], dtype=dtype)
        assert out["pixel_values"].dtype == dtype and out["input_ids"].dtype == torch.long
