"""Zoo registry and cache: reuse, atomic builds, clear errors."""

from __future__ import annotations

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
