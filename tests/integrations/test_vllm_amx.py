"""The vLLM plugin asks for AMX permission in every process it is loaded in: vLLM's bf16 CPU
attention runs AMX tile instructions wherever CPUID lists them but never asks Linux for them,
and a packed model (whose linears never reach oneDNN, which would ask) died with SIGILL."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from bivlm_plugin.integrations import vllm as bivlm_vllm


def test_request_amx_asks_only_where_the_cpu_has_tiles(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: calls.append(1) or True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert bivlm_vllm.request_amx() is False and calls == []
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bivlm_vllm.request_amx() is True and calls == [1]


def test_request_amx_warns_when_refused(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False, raising=False)
    with caplog.at_level("WARNING"):
        assert bivlm_vllm.request_amx() is False
    assert "--dtype float32" in caplog.text


def test_register_asks_for_amx(monkeypatch) -> None:
    pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
    calls = []
    monkeypatch.setattr(bivlm_vllm, "request_amx", lambda: calls.append(1) or False)
    bivlm_vllm.register()
    assert calls == [1]


_PERMITTED = """
import ctypes, sys
from bivlm_plugin.integrations.vllm import register
libc = ctypes.CDLL(None, use_errno=True)
mask = ctypes.c_uint64(0)
ARCH_GET_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1022, 18, 158
def permitted():
    assert libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) == 0
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)
before = permitted()
register()
print(before, permitted())
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="AMX permission is a Linux x86_64 request",
)
def test_a_fresh_process_holds_amx_permission_after_register() -> None:
    """Where the CPU has AMX tiles, a new process has no permission until ``register()``
    (what vLLM calls in each of its processes) asks for it."""
    pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU lists no AMX tiles")
    proc = subprocess.run(
        [sys.executable, "-c", _PERMITTED], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = proc.stdout.split()[-2:]
    assert (before, after) == ("False", "True"), proc.stdout
