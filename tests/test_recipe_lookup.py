"""Shipped recipes found by name (``--recipe bivlm_vlm_w2``) or path, from a checkout or a wheel."""

from __future__ import annotations

from pathlib import Path

import pytest

from bivlm_plugin.app.recipes import RECIPES_DIR, find_recipe, standard_recipes

REPO = Path(__file__).resolve().parents[1]


def test_names_and_paths_resolve() -> None:
    want = (REPO / "recipes" / "bivlm_vlm_w2.yaml").resolve()
    assert find_recipe("bivlm_vlm_w2").resolve() == want
    assert find_recipe("bivlm_vlm_w2.yaml").resolve() == want
    assert find_recipe(REPO / "recipes" / "bivlm_vlm_w2.yaml").resolve() == want
    assert set(standard_recipes()) == {p.stem for p in (REPO / "recipes").glob("*.yaml")}


def test_unknown_recipe_lists_the_shipped_ones(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope is neither a file nor a shipped recipe"):
        find_recipe("nope")
    with pytest.raises(FileNotFoundError, match="bivlm_lm_w1, bivlm_lm_w2"):
        find_recipe(tmp_path / "missing.yaml")  # a path that is not there is not a name


def test_the_package_ships_the_top_level_recipes() -> None:
    """``src/bivlm_plugin/recipes`` links to ``recipes/`` (one copy) and is package data."""
    assert RECIPES_DIR.resolve() == (REPO / "recipes").resolve()
    text = (REPO / "pyproject.toml").read_text()
    assert "[tool.setuptools.package-data]\n" in text
    assert 'bivlm_plugin = ["recipes/*.yaml"]' in text


def test_cli_lists_the_shipped_recipes(capsys) -> None:
    from bivlm_plugin.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "bivlm_vlm_w2" in out and "gptq_w3a16_g64_asym_vlm" in out
