"""Recipe checks llm-compressor does not do.

llm-compressor reads modifiers only from ``<name>_stage: {<group>_modifiers: {Modifier: args}}``;
any other layout (a bare ``BiVLMModifier:`` at the top, a missing ``_modifiers`` suffix) yields
zero modifiers and a run that silently changes nothing. We reject that, naming what was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_recipe", "recipe_modifiers"]

EXAMPLE = """quant_stage:
  quant_modifiers:
    BiVLMModifier:
      method: bivlm
      targets: [Linear]"""


def recipe_modifiers(recipe: dict[str, Any], source: str = "recipe") -> dict[str, dict]:
    """Return {modifier name: args} from a parsed recipe, or raise if the nesting is wrong."""
    if not isinstance(recipe, dict) or not recipe:
        raise ValueError(f"{source} is empty or not a mapping; expected e.g.\n{EXAMPLE}")
    found: dict[str, dict] = {}
    problems: list[str] = []
    for stage_key, stage in recipe.items():
        if not str(stage_key).endswith("_stage"):
            problems.append(f"top-level key {stage_key!r} does not end in '_stage'")
            continue
        if not isinstance(stage, dict):
            problems.append(f"{stage_key!r} is not a mapping")
            continue
        for group_key, group in stage.items():
            if not str(group_key).endswith("_modifiers") or not isinstance(group, dict):
                problems.append(f"{stage_key}.{group_key} is not a '<name>_modifiers' mapping")
                continue
            for name, args in group.items():
                found[str(name)] = dict(args or {})
    if problems or not found:
        detail = "; ".join(problems) or "no modifiers found"
        raise ValueError(
            f"{source} has no usable '<name>_stage: <name>_modifiers: Modifier:' nesting "
            f"({detail}). llm-compressor would silently apply nothing. Expected e.g.\n{EXAMPLE}"
        )
    return found


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a YAML recipe file; returns the parsed mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist; see recipes/ for examples")
    recipe = yaml.safe_load(path.read_text())
    recipe_modifiers(recipe, source=f"recipe {path}")
    return recipe
