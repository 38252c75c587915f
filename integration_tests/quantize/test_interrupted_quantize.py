"""A `bivlm quantize` run killed mid-way (SIGKILL) or interrupted while saving leaves nothing
that loads as a checkpoint, and the next run starts clean.

The kills are placed at the worst moments, found by pausing a real run in a subprocess:
during calibration (before any output exists), in the middle of the save (weights and config
written, tokenizer and report not yet), and after every file is written but before the
temporary folder is renamed into place.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "llmcompressor", reason="needs llm-compressor (pip install 'bivlm-plugin[llmcompressor]')"
)

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "bivlm_lm_w1.yaml"

# Runs `bivlm quantize` with one pause point patched in; the pause writes FLAG and sleeps
# until the test kills the process.
RUNNER = r"""
import contextlib, os, sys, time
from pathlib import Path

stage, flag = os.environ["PAUSE_AT"], Path(os.environ["PAUSE_FLAG"])

def pause(what):
    flag.write_text(what)
    time.sleep(600)

import bivlm_plugin.app.quantize as q

if stage == "calibration":
    from bivlm_plugin.core.hessian import HessianAccumulator
    def add(self, x):
        pause("calibration")
    HessianAccumulator.add = add
elif stage == "mid_save":
    from transformers import PreTrainedTokenizerBase
    def save_pretrained(self, *a, **k):
        pause("mid_save")
    PreTrainedTokenizerBase.save_pretrained = save_pretrained
elif stage == "before_rename":
    real = q.atomic_directory
    @contextlib.contextmanager
    def atomic_directory(target):
        with real(target) as tmp:
            yield tmp
            pause(str(tmp))
    q.atomic_directory = atomic_directory

from bivlm_plugin.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _args(model_dir: Path, out: Path, data: Path) -> list[str]:
    return [
        "quantize",
        "--model",
        str(model_dir),
        "--recipe",
        str(RECIPE),
        "--output",
        str(out),
        "--data",
        str(data),
        "--num-calibration-samples",
        "2",
        "--set",
        "refine_iters=0",
    ]


def _kill_at(stage: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    flag = tmp_path / f"paused-{stage}"
    env = {**os.environ, "PAUSE_AT": stage, "PAUSE_FLAG": str(flag)}
    proc = subprocess.Popen(
        [sys.executable, str(runner), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {stage}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {stage} in 300 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return proc


def _loads(folder: Path) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("stage", ["calibration", "mid_save", "before_rename"])
def test_sigkill_leaves_nothing_loadable_and_the_next_run_starts_clean(
    stage, tiny_llama_dir, wikitext_dir, tmp_path
) -> None:
    from bivlm_plugin.cli import main

    out = tmp_path / "q"
    args = _args(tiny_llama_dir, out, wikitext_dir)
    _kill_at(stage, args, tmp_path)

    assert not out.exists(), f"killed at {stage}, yet {out} exists"
    assert not _loads(out)
    left = list(tmp_path.glob(".q.writing-*"))
    if stage == "calibration":
        assert not left  # nothing written yet
    else:
        # The dead run's temporary folder: hidden, never at the output path.
        assert len(left) == 1 and left[0].is_dir()
        assert not (left[0] / "bivlm_report.json").exists() or stage == "before_rename"

    # The next run needs no --overwrite, removes the dead run's temporary and writes a
    # checkpoint that loads packed.
    assert main(args) == 0
    assert not list(tmp_path.glob(".q.writing-*"))
    report = json.loads((out / "bivlm_report.json").read_text())
    assert report["format"] == "bivlm-binary"
    assert _loads(out)


def test_interrupted_save_keeps_the_previous_checkpoint(
    tiny_llama_dir, wikitext_dir, tmp_path, monkeypatch
) -> None:
    """Ctrl-C (KeyboardInterrupt) during an --overwrite save: the earlier checkpoint stays as it
    was and loads; no temporary is left."""
    from transformers import PreTrainedTokenizerBase

    from bivlm_plugin.cli import main

    out = tmp_path / "q"
    args = _args(tiny_llama_dir, out, wikitext_dir)
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--overwrite"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".q.writing-*"))
    monkeypatch.undo()
    assert _loads(out)


def test_a_live_runs_temporary_is_left_alone(tmp_path) -> None:
    """Only a dead process's temporaries are swept: a concurrent live writer keeps its own."""
    from bivlm_plugin.utils import atomic_directory, sweep_stale_temporaries

    target = tmp_path / "m"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f".m.writing-{live.pid}-abc").mkdir()
        (tmp_path / f".m.writing-{dead.pid}-def").mkdir()
        (tmp_path / ".m.writing-notapid").mkdir()
        with atomic_directory(target) as tmp:
            (tmp / "x").write_text("1")
        assert (target / "x").read_text() == "1"
        names = sorted(p.name for p in tmp_path.iterdir())
        assert f".m.writing-{live.pid}-abc" in names
        assert f".m.writing-{dead.pid}-def" not in names
        assert ".m.writing-notapid" in names  # not ours to judge
        assert sweep_stale_temporaries(target) == []
    finally:
        live.kill()
        live.wait()
