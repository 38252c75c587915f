"""Slow: build the real reference LM and pin its P1 perplexity (opt-in: pytest -m slow)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

# Measured 2026-11-27 on the 2-core CPU machine (float32 compute): see docs/RESULTS.md.
SMOLLM2_P1_PPL = 26.1367
TOLERANCE = 0.01  # relative: float32 summation order differs across BLAS builds


def test_smollm2_build_and_p1_ppl(wikitext_dir, tmp_path) -> None:
    from bivlm_plugin import zoo
    from bivlm_plugin.cli import main

    folder = zoo.build("smollm2-135m")
    info = json.loads((folder / "bivlm_zoo.json").read_text())
    assert info["reply"]
    out = tmp_path / "ppl.json"
    assert (
        main(
            ["eval", "ppl", "--model", str(folder), "--data", str(wikitext_dir), "--json", str(out)]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n_tokens"] == 32704
    assert res["ppl"] == pytest.approx(SMOLLM2_P1_PPL, rel=TOLERANCE)
