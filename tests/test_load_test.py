"""``bivlm bench load``'s pieces without a server: request mix, percentiles, input checks."""

from __future__ import annotations

import json

import pytest

from bivlm_plugin.app.load_test import mixed_requests, percentile, run_load_test
from bivlm_plugin.app.serve import chat_body, image_chat_body


def test_mixed_requests_alternate_image_and_text() -> None:
    bodies = mixed_requests("m", 5, [(b"png0", "q0"), (b"png1", "q1")], max_tokens=3)
    kinds = ["image_url" in json.dumps(b) for b in bodies]
    assert kinds == [True, False, True, False, True]
    assert bodies[0] == image_chat_body("m", b"png0", "q0", 3, ignore_eos=True,
                                        return_token_ids=True)  # fmt: skip
    assert bodies[2]["messages"][0]["content"][1]["text"] == "q1"
    assert bodies[1] == chat_body("m", "Name three primary colours.", 3, ignore_eos=True,
                                  return_token_ids=True)  # fmt: skip
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 3 for b in bodies)


def test_percentile_interpolates() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3.97)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_bad_counts_name_the_flag(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="--requests must be at least 1, got 0"):
        mixed_requests("m", 0, [(b"p", "q")])
    with pytest.raises(ValueError, match="--concurrency must be at least 1, got 0"):
        run_load_test("http://127.0.0.1:9", [chat_body("m", "hi")], concurrency=0)
    from bivlm_plugin.cli import main

    (tmp_path / "config.json").write_text("{}")
    # Fails before any server starts (no vLLM process, no log written).
    assert main(["bench", "load", "--model", str(tmp_path), "--requests", "0",
                 "--log", str(tmp_path / "x.log")]) == 2  # fmt: skip
    assert "--requests must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.log").exists()
