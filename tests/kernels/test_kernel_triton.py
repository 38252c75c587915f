"""Triton kernel logic on CPU tensors under TRITON_INTERPRET=1 (small shapes, seconds).

TRITON_INTERPRET must be set before triton is first imported (triton.language's own jit helpers
are decorated at import), so in-process tests run only when the whole pytest process was started
with it; ``test_gpu_check_interpret_subprocess`` always runs the same checks in a fresh process.

Tolerance as for the CPU kernel, plus bf16 / fp16 weight tiles on the tl.dot path (batch >= 16):
||y - y_ref|| / ||y_ref|| < 1e-5 (fp32), 2e-3 (fp16), 1e-2 (bf16).
"""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin.format import layout_of, pack, shard_columns
from bivlm_plugin.format.synthetic import random_codes
from bivlm_plugin.kernels.reference import binary_linear_reference

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [
    (7, 33, 1, 2, "row_ring", "row"),
    (20, 100, 2, 3, "ring", "row_subset"),
    (9, 70, 4, 5, "row_ring", "row_subset"),
    (33, 300, 3, 0, "row_ring", "row"),
]


@pytest.fixture
def interpret():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("in-process interpreter tests need TRITON_INTERPRET=1 before triton imports")


def test_gpu_check_interpret_subprocess(tmp_path) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bivlm_plugin.kernels.gpu_check", "--interpret", "--json", out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["all_ok"] and len(res["correctness"]) >= 100


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpret_matches_reference(interpret, case) -> None:
    from bivlm_plugin.kernels.triton_kernel import TritonKernel

    o, i, n, k, sm, mm = case
    codes = random_codes(o, i, n, k, sm, mm, seed=o)
    packed, layout = pack(codes), layout_of(codes)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(o, generator=g)
    for batch in (1, 3, 17):
        x32 = torch.randn(batch, i, generator=g)
        for dtype, tol in TOL.items():
            x = x32.to(dtype)
            assert TritonKernel.can_implement(x, layout) == (True, "")
            b = bias if batch == 3 else None
            y = TritonKernel.run(x, packed, layout, b)
            ref = binary_linear_reference(x, packed, layout, b)
            err = float((y.float() - ref.float()).norm() / ref.float().norm())
            assert y.dtype == dtype and err < tol, (batch, dtype, err)


def test_triton_interpret_variable_k(interpret) -> None:
    from bivlm_plugin.kernels.triton_kernel import TritonKernel

    codes = random_codes(12, 130, 2, 6, seed=2)
    sp, sl = shard_columns(pack(codes), layout_of(codes), 32, 130)
    x = torch.randn(2, 98)
    ref = binary_linear_reference(x, sp, sl)
    err = float((TritonKernel.run(x, sp, sl, None) - ref).norm() / ref.norm())
    assert err < 1e-5


def test_triton_declines_cpu_without_interpreter(monkeypatch) -> None:
    from bivlm_plugin.kernels.triton_kernel import TritonKernel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = TritonKernel.can_implement(torch.zeros(1, 33), layout_of(random_codes(2, 33)))
    assert not ok and "TRITON_INTERPRET" in reason
