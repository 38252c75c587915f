"""Input checks shared by every layer quantizer (Bi-VLM and the baselines).

Each check raises ``ValueError`` with a message that names the offending value (shape, count,
first position) and what to do about it; callers prefix the method name.
"""

from __future__ import annotations

import torch

__all__ = ["require_finite"]


def require_finite(t: torch.Tensor, what: str, fix: str) -> None:
    """Raise ValueError when ``t`` holds NaN or inf.

    Args:
        t: the tensor to check (any float dtype).
        what: how the message names it, e.g. ``"bivlm: weight"``.
        fix: what the caller should do, appended to the message.
    """
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    n = int(bad.sum())
    first = [int(i) for i in bad.nonzero()[0]]
    value = float(t[tuple(first)])
    raise ValueError(
        f"{what} {tuple(t.shape)} contains NaN or inf: {n} non-finite value(s) of "
        f"{t.numel()}, the first {value} at {first}; {fix}"
    )
