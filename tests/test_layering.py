"""Architecture checks: core/ is pure torch; dependencies point inward only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "bivlm_plugin"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside the package
                out.append(
                    ("bivlm_plugin.core" if path.is_relative_to(PKG / "core") else "?", node.lineno)
                )
            elif node.module:
                out.append((node.module, node.lineno))
    return out


CORE_FILES = sorted((PKG / "core").rglob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_core_imports_only_torch_and_stdlib(path: Path) -> None:
    bad = []
    for name, line in _imports(path):
        top = name.split(".")[0]
        if top in STDLIB or top == "torch" or name.startswith("bivlm_plugin.core"):
            continue
        bad.append(f"{path.name}:{line} imports {name}")
    assert not bad, "core/ must import only torch, the standard library and core/: " + "; ".join(
        bad
    )


def test_core_is_not_empty() -> None:
    assert len(CORE_FILES) >= 4


@pytest.mark.parametrize("layer", ["format", "kernels", "pruning"])
def test_inner_layers_do_not_import_integrations(layer: str) -> None:
    for path in (PKG / layer).rglob("*.py"):
        for name, line in _imports(path):
            assert not name.startswith("bivlm_plugin.integrations"), f"{path}:{line} imports {name}"


def test_integrations_do_not_import_each_other() -> None:
    root = PKG / "integrations"
    for sub in [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")]:
        for path in sub.rglob("*.py"):
            for name, line in _imports(path):
                if name.startswith("bivlm_plugin.integrations."):
                    assert name.split(".")[2] == sub.name, f"{path}:{line} imports {name}"


def test_integrations_hold_adapters_only() -> None:
    """integrations/ adapts frameworks: it imports neither the application (app/, cli) nor the
    evaluation harness (eval/); eval/ does not import integrations/ either."""
    for path in (PKG / "integrations").rglob("*.py"):
        for name, line in _imports(path):
            bad = ("bivlm_plugin.eval", "bivlm_plugin.app", "bivlm_plugin.cli")
            assert not name.startswith(bad), f"{path}:{line} imports {name}"
    for path in (PKG / "eval").rglob("*.py"):
        for name, line in _imports(path):
            assert not name.startswith("bivlm_plugin.integrations"), f"{path}:{line} imports {name}"
