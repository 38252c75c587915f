"""Run a callback right after a module is imported, or now if it already is.

``import bivlm_plugin`` must register ``BiVLMModifier`` with llm-compressor, but importing
llm-compressor costs seconds and pulls in half the stack: a vLLM worker or ``bivlm zoo list``
should not pay that. So registration waits for llm-compressor's own import, whichever of the two
packages is imported first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable

__all__ = ["when_imported"]

_PENDING: dict[str, list[Callable[[], None]]] = {}


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PENDING:
            return None
        # Ask the other finders, then wrap the loader so our callbacks run after exec_module.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_notify(module):
            exec_module(module)
            for callback in _PENDING.pop(fullname, []):
                callback()

        loader.exec_module = exec_and_notify
        return spec


_FINDER = _PostImportFinder()


def when_imported(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``module`` is imported (at once if it already is)."""
    if module in sys.modules:
        callback()
        return
    _PENDING.setdefault(module, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
