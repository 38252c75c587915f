"""Corrupt bivlm-binary checkpoints fail in vLLM too, naming the tensor and what to do.

The same tiny packed LLaMA and corruptions as ``test_bad_checkpoints.py`` (transformers), loaded
with vLLM's offline ``LLM(...)``: a packed tensor missing, of the wrong shape or dtype, or the
file truncated. vLLM reads our headers before it allocates a layer (``BiVLMLinearMethod.
create_weights`` -> ``layout_from_header``), so each fails at load with a ValueError naming the
checkpoint key, and no engine is returned. All folders load in one process, the good copy
last: it still loads after the failures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install 'bivlm-plugin[vllm]')")
pytest.importorskip("llmcompressor", reason="needs llm-compressor")

from test_bad_checkpoints import CASES, FILE, M, _corrupt, packed_dir  # noqa: E402,F401

RUNNER = Path(__file__).with_name("vllm_load_runner.py")
FIX = "write it again"
PICKED = {  # one of each kind (the transformers test runs all of CASES)
    "missing scales": FIX,
    "missing salient_sign2": FIX,
    "signs one word short": FIX,
    "scales for four rings": FIX,
    "signs as int64": FIX,
    "scales as float32": FIX,
    # vLLM asks for the modules its quantization_config targets: it names the missing key and
    # the folder
    "missing signs": "the checkpoint is incomplete or was written for another architecture",
}


@pytest.mark.integration
def test_vllm_refuses_corrupt_checkpoints_naming_the_tensor(packed_dir, tmp_path) -> None:  # noqa: F811
    folders = {
        case: _corrupt(packed_dir, tmp_path / case.replace(" ", "_"), CASES[case][0])
        for case in PICKED
    }
    cut = tmp_path / "truncated"
    shutil.copytree(packed_dir, cut)
    raw = (cut / FILE).read_bytes()
    (cut / FILE).write_bytes(raw[:-100])
    good = _corrupt(packed_dir, tmp_path / "good", lambda t: None)
    order = [*folders.values(), cut, good]
    out = tmp_path / "out.json"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(out), *map(str, order)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(out.read_text())
    for case, folder in folders.items():
        r = res[str(folder)]
        assert not r["loaded"], f"{case}: loaded"
        # vLLM checks the stored shapes against each other (rows from signs), transformers also
        # against the model's out_features: the messages agree up to that origin note.
        needle = CASES[case][1].split(" for out_features")[0]
        if case == "missing signs":  # vLLM names the module it was told to load
            needle = f"stores no {M}.signs"
        assert needle in r["error"], f"{case}: {r['type']}: {r['error'][:600]}"
        assert PICKED[case] in r["error"], f"{case}: no fix in {r['error'][:600]}"
    r = res[str(cut)]
    assert not r["loaded"] and "is truncated" in r["error"] and "download or save" in r["error"]
    assert f"{M}" in r["error"] or "tensors cut off" in r["error"]
    r = res[str(good)]
    assert r["loaded"], f"the untouched copy failed after the corrupt ones: {r['error']}"
    assert r["quantization"] == "bivlm"
