"""Image-token importance scores and keep masks, pure torch.

A score gives each image token of each image one number; pruning keeps the highest-scoring
``1 - ratio`` of them, in their original order. Scores:

- ``text_attention`` (FastV-style, text-conditioned): attention the text tokens after the image
  give each image token at an early language-model layer, averaged over heads and text queries.
- ``cls_attention`` (text-agnostic): attention the vision tower's CLS token gives each patch at
  a tower layer, averaged over heads.
- ``mean_attention`` (text-agnostic): attention each patch receives from all tower tokens.
- ``feature_norm`` (text-agnostic): L2 norm of each image token's feature.

Text-agnostic scores depend on the image alone, so they fit a serving prefix cache.

``merge_pruned`` is the optional second step (in the manner of LLaVA-PruMerge): instead of
dropping the pruned tokens, each joins the kept token its feature is most like, and every kept
token becomes the mean of itself and the tokens that joined it. It too reads the image alone.

Non-goals: running models or hooking layers (the integrations do that), choosing the ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "CONFIG_KEY",
    "SCORES",
    "SERVING_FAMILIES",
    "SERVING_FAMILY_SCORES",
    "SERVING_SCORES",
    "Score",
    "check_prune_merge",
    "cls_attention_scores",
    "feature_norm_scores",
    "keep_count",
    "keep_indices",
    "keep_mask",
    "mean_attention_scores",
    "merge_pruned",
    "text_attention_scores",
]


def text_attention_scores(
    attn: torch.Tensor, image_mask: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """FastV-style: attention the text gives each image token at one language-model layer.

    Args:
        attn: (B, H, T, T) attention probabilities of the layer (rows are queries).
        image_mask: (B, T) bool, True at image-token positions; every row has the same count N.
        text_mask: (B, T) bool, True at the text queries to average over (e.g. the tokens after
            the image); at least one per row.

    Returns:
        (B, N) float32 scores, image tokens in sequence order.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (B, H, T, T), got {tuple(attn.shape)}")
    counts = image_mask.sum(1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError(f"every row needs the same number of image tokens, got {counts.tolist()}")
    n_text = text_mask.sum(1, keepdim=True)
    if bool((n_text == 0).any()):
        raise ValueError("text_mask selects no query in some row: the score needs text")
    received = attn.float().mean(1)  # (B, T, T)
    per_key = (received * text_mask.unsqueeze(-1)).sum(1) / n_text  # (B, T)
    return per_key[image_mask].view(attn.shape[0], -1)


def cls_attention_scores(attn: torch.Tensor) -> torch.Tensor:
    """Attention the CLS token (position 0) gives each patch at one vision-tower layer.

    Args:
        attn: (B, H, 1 + N, 1 + N) attention probabilities, CLS first.

    Returns:
        (B, N) float32 scores.
    """
    if attn.dim() != 4 or attn.shape[-1] < 2:
        raise ValueError(f"attn must be (B, H, 1 + N, 1 + N), got {tuple(attn.shape)}")
    return attn.float().mean(1)[:, 0, 1:]


def mean_attention_scores(attn: torch.Tensor, drop_cls: bool = True) -> torch.Tensor:
    """Attention each patch receives, averaged over heads and all query tokens.

    Args:
        attn: (B, H, S, S) attention probabilities of one vision-tower layer.
        drop_cls: the first token is a CLS token that is not an image token (LLaVA's
            ``default`` feature strategy); its column is dropped.

    Returns:
        (B, S - 1) or (B, S) float32 scores.
    """
    if attn.dim() != 4:
        raise ValueError(f"attn must be (B, H, S, S), got {tuple(attn.shape)}")
    received = attn.float().mean(1).mean(1)  # (B, S)
    return received[:, 1:] if drop_cls else received


def feature_norm_scores(features: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image token's feature.

    Args:
        features: (B, N, D) image-token features (e.g. the projector's output).

    Returns:
        (B, N) float32 scores.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, D), got {tuple(features.shape)}")
    return features.float().norm(dim=-1)


def keep_count(n: int, ratio: float) -> int:
    """How many of ``n`` tokens survive pruning ``ratio`` of them: round(n * (1 - ratio)),
    halves rounded up, at least 1.

    Raises:
        ValueError: ``ratio`` outside [0, 1) or ``n`` < 1.
    """
    if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}; e.g. 0.9 keeps 10%")
    if n < 1:
        raise ValueError(f"need at least one image token to prune, got n={n}")
    return max(1, math.floor(n * (1.0 - ratio) + 0.5))


def check_prune_merge(ratio: float | None, merge: bool) -> None:
    """Merging needs pruning: ``merge`` with a ratio of 0 (or none) fails, naming the flags."""
    if merge and not ratio:
        raise ValueError("--prune-merge needs --prune-ratio > 0 (there is nothing to merge)")


def keep_indices(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the tokens to keep, ascending (original order).

    Ties are broken toward the earlier token, so the result is deterministic.

    Args:
        scores: (B, N) importance, higher is kept first.
        ratio: share of the N tokens to drop, in [0, 1).

    Returns:
        (B, k) int64, k = ``keep_count(N, ratio)``, each row sorted ascending.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), got {tuple(scores.shape)}")
    k = keep_count(scores.shape[1], ratio)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf; check the attention / features they came from")
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def keep_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, N) bool, True at the ``keep_count(N, ratio)`` tokens of ``keep_indices``."""
    idx = keep_indices(scores, ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, idx, True)


def merge_pruned(features: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The kept tokens' features with the pruned ones merged into them.

    Each of the N tokens joins the kept token whose feature has the highest cosine similarity
    with its own (ties toward the earlier kept token; a kept token always joins itself), and
    each kept token's output is the plain mean of the features that joined it, in float32.

    Args:
        features: (B, N, D) image-token features (what the language model would receive).
        kept: (B, k) int64 kept indices, each row distinct (``keep_indices``).

    Returns:
        (B, k, D) in ``features``' dtype, kept tokens in the order of ``kept``.
    """
    if features.dim() != 3 or kept.dim() != 2 or kept.shape[0] != features.shape[0]:
        raise ValueError(
            f"features must be (B, N, D) and kept (B, k), got {tuple(features.shape)} and "
            f"{tuple(kept.shape)}"
        )
    b, n, d = features.shape
    k = kept.shape[1]
    if k == 0 or bool(((kept < 0) | (kept >= n)).any()):
        raise ValueError(f"kept must hold 1 to {n} indices in [0, {n}), got {kept.tolist()}")
    f = features.float()
    unit = torch.nn.functional.normalize(f, dim=-1)
    kept = kept.to(features.device)
    anchors = unit.gather(1, kept.unsqueeze(-1).expand(-1, -1, d))  # (B, k, D)
    target = (unit @ anchors.transpose(1, 2)).argmax(-1)  # (B, N), first maximum on ties
    target = target.scatter(1, kept, torch.arange(k, device=f.device).expand(b, -1))
    sums = f.new_zeros(b, k, d).scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, d), f)
    counts = f.new_zeros(b, k).scatter_add_(1, target, f.new_ones(b, n))
    return (sums / counts.unsqueeze(-1)).to(features.dtype)


@dataclass(frozen=True)
class Score:
    """A registered score: its function, and whether it needs the text (not prefix-cacheable)."""

    name: str
    fn: Callable[..., torch.Tensor]
    text_agnostic: bool
    needs: str  # what the integration must capture: "lm_attention", "vision_attention", ...


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("text_attention", text_attention_scores, False, "lm_attention"),
        Score("cls_attention", cls_attention_scores, True, "vision_attention"),
        Score("mean_attention", mean_attention_scores, True, "vision_attention"),
        Score("feature_norm", feature_norm_scores, True, "image_features"),
    )
}

# The checkpoint / config entry that turns pruning on when serving, and the scores a server can
# use (text-agnostic: an image's tokens must not depend on the prompt beside it).
CONFIG_KEY = "bivlm_pruning"
SERVING_SCORES = ("feature_norm", "cls_attention", "mean_attention")
# model_type -> the serving scores its vLLM hook computes (Qwen towers have no CLS token).
SERVING_FAMILY_SCORES = {
    "llava": ("feature_norm", "cls_attention", "mean_attention"),
    "qwen2_vl": ("feature_norm", "mean_attention"),
    "qwen2_5_vl": ("feature_norm", "mean_attention"),
}
SERVING_FAMILIES = tuple(SERVING_FAMILY_SCORES)  # model_type values the vLLM hook prunes
