"""Perplexity under protocol P1 (DESIGN.md section 5).

Every window scores its ``seqlen - 1`` next-token predictions; ppl = exp(mean NLL) over all of
them, computed in float32.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["PplResult", "perplexity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> PplResult:
    """Perplexity of a causal LM over token windows.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seqlen, vocab).
        windows: (n_windows, seqlen) int64 token ids.
        batch_size: windows per forward pass.
        progress: show a tqdm bar.
    """
    if windows.ndim != 2:
        raise ValueError(f"windows must be (n_windows, seqlen), got shape {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    n_windows, seqlen = windows.shape
    total_nll = 0.0
    n_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=n_windows, desc="P1 perplexity", unit="win", disable=not progress)
    for i in range(0, n_windows, batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        n_tokens += targets.numel()
        bar.update(batch.shape[0])
    bar.close()
    mean_nll = total_nll / n_tokens
    return PplResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )
