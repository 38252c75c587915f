"""The standard recipes, shipped with the package, found by name or path.

``recipes/`` at the top of the repository is the one copy; ``src/bivlm_plugin/recipes`` links to
it, and wheels carry its YAML files as package data, so ``--recipe bivlm_vlm_w2`` works from a
checkout and from an installed wheel alike.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPES_DIR", "find_recipe", "standard_recipes"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def standard_recipes() -> list[str]:
    """Names (file stems) of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_recipe(spec: str | Path) -> Path:
    """A recipe file from a path, or from a shipped recipe's name (with or without ``.yaml``).

    Raises:
        FileNotFoundError: neither; the message lists the shipped names.
    """
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    if path.parent == Path(".") and (RECIPES_DIR / name).is_file():
        return RECIPES_DIR / name
    raise FileNotFoundError(
        f"--recipe {spec} is neither a file nor a shipped recipe; shipped: "
        f"{', '.join(standard_recipes())} (pass a name, e.g. bivlm_vlm_w2, or a path)"
    )
