"""pruning/scores.py by hand on small tensors."""

from __future__ import annotations

import pytest
import torch

from bivlm_plugin.pruning.scores import (
    SCORES,
    cls_attention_scores,
    feature_norm_scores,
    keep_count,
    keep_indices,
    keep_mask,
    mean_attention_scores,
    merge_pruned,
    text_attention_scores,
)


def test_keep_count() -> None:
    assert keep_count(64, 0.0) == 64
    assert keep_count(64, 0.5) == 32
    assert keep_count(64, 0.9) == 6  # 6.4
    assert keep_count(64, 0.95) == 3  # 3.2
    assert keep_count(64, 0.99) == 1  # 0.64 -> 1
    assert keep_count(10, 0.25) == 8  # 7.5 rounds up
    assert keep_count(3, 0.999) == 1  # never zero
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\)"):
            keep_count(64, bad)
    with pytest.raises(ValueError, match="at least one image token"):
        keep_count(0, 0.5)


def test_keep_indices_order_and_ties() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    idx = keep_indices(scores, 0.5)  # keep round(2.5) = 3
    assert idx.tolist() == [[1, 2, 3], [0, 1, 2]]  # original order; ties to the earlier token
    mask = keep_mask(scores, 0.5)
    assert mask.tolist() == [[False, True, True, True, False], [True, True, True, False, False]]
    assert keep_indices(scores, 0.0).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert keep_indices(scores, 0.99).tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="NaN or inf"):
        keep_indices(torch.tensor([[0.0, float("nan")]]), 0.5)


def test_text_attention_scores_by_hand() -> None:
    # T = 5: [bos, img, img, txt, txt]; one head, rows are queries.
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 3] = torch.tensor([0.1, 0.6, 0.2, 0.1, 0.0])
    attn[0, 0, 4] = torch.tensor([0.1, 0.2, 0.4, 0.1, 0.2])
    attn[0, 0, 1, 1] = 1.0  # an image query: not counted
    image = torch.tensor([[False, True, True, False, False]])
    text = torch.tensor([[False, False, False, True, True]])
    got = text_attention_scores(attn, image, text)
    torch.testing.assert_close(got, torch.tensor([[0.4, 0.3]]))
    two_heads = torch.cat([attn, torch.zeros_like(attn)], dim=1)
    torch.testing.assert_close(text_attention_scores(two_heads, image, text), got / 2)
    with pytest.raises(ValueError, match="needs text"):
        text_attention_scores(attn, image, torch.zeros_like(text))


def test_vision_scores_by_hand() -> None:
    attn = torch.zeros(1, 2, 3, 3)  # CLS + 2 patches, 2 heads
    attn[0, 0, 0] = torch.tensor([0.2, 0.7, 0.1])
    attn[0, 1, 0] = torch.tensor([0.2, 0.3, 0.5])
    attn[0, :, 1] = torch.tensor([0.0, 1.0, 0.0])
    attn[0, :, 2] = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(cls_attention_scores(attn), torch.tensor([[0.5, 0.3]]))
    # received from all 3 queries: patch 1: (0.5 + 1 + 0) / 3, patch 2: (0.3 + 0 + 1) / 3
    torch.testing.assert_close(mean_attention_scores(attn), torch.tensor([[0.5, 1.3 / 3]]))
    assert mean_attention_scores(attn, drop_cls=False).shape == (1, 3)
    feats = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]]])
    torch.testing.assert_close(feature_norm_scores(feats), torch.tensor([[5.0, 1.0, 2**0.5]]))


def test_registry_marks_text_agnostic_scores() -> None:
    assert not SCORES["text_attention"].text_agnostic
    assert {n for n, s in SCORES.items() if s.text_agnostic} == {
        "cls_attention",
        "mean_attention",
        "feature_norm",
    }


def test_merge_pruned_by_hand() -> None:
    # Tokens 0 and 2 kept. Token 1 points like token 2 (cosine 1), token 3 like token 0; the
    # magnitudes differ, so the means show which token joined which.
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 1.0], [3.0, 0.0]]])
    out = merge_pruned(f, torch.tensor([[0, 2]]))
    assert torch.equal(out, torch.tensor([[[2.0, 0.0], [0.0, 1.5]]]))
    # A tie (token 1 equally like both kept tokens) goes to the earlier kept token.
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    expected = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])
    assert torch.equal(merge_pruned(g, torch.tensor([[0, 2]])), expected)
    # Keeping everything changes nothing; the dtype is kept; rows are independent.
    h = torch.randn(2, 5, 3).to(torch.bfloat16)
    all_kept = torch.arange(5).expand(2, -1)
    assert torch.equal(merge_pruned(h, all_kept), h)
    kept = torch.tensor([[1, 3], [0, 4]])
    both = merge_pruned(h, kept)
    assert both.dtype == torch.bfloat16
    assert torch.equal(both[1:], merge_pruned(h[1:], kept[1:]))


def test_merge_pruned_duplicate_features_join_themselves() -> None:
    # Two kept tokens with the same feature: each still keeps itself (no empty mean).
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    out = merge_pruned(f, torch.tensor([[0, 1]]))
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.tensor([[[1.5, 0.0], [1.0, 0.0]]]))


def test_merge_pruned_rejects_bad_input() -> None:
    f = torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match=r"features must be \(B, N, D\)"):
        merge_pruned(f[0], torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"kept must hold 1 to 4 indices"):
        merge_pruned(f, torch.tensor([[0, 4]]))
