"""Gaussian-quantile partition: thresholds by hand, ring shares on Gaussian data, top-k rows."""

from __future__ import annotations

import math

import pytest
import torch

from bivlm_plugin.core.partition import (
    gaussian_thresholds,
    partition,
    row_stats,
    saliency_score,
    salient_count,
)


def test_thresholds_hand_values() -> None:
    # PhiInv(0.995) = 2.5758293, PhiInv(0.75) = 0.6744898, PhiInv(0.6..0.9) below.
    t = gaussian_thresholds(2.0, 0.01, 1)
    assert t.shape == (1,)
    assert t[0].item() == pytest.approx(2.0 * 2.5758293, rel=1e-6)
    t = gaussian_thresholds(1.0, 0.0, 2)
    assert t[0].item() == pytest.approx(0.6744898, rel=1e-6)
    assert math.isinf(t[1].item())
    t = gaussian_thresholds(1.0, 0.2, 4)
    want = [0.2533471, 0.5244005, 0.8416212, 1.2815516]
    assert t.tolist() == pytest.approx(want, rel=1e-6)


def test_thresholds_per_row_sigma() -> None:
    sigma = torch.tensor([[1.0], [3.0]])
    t = gaussian_thresholds(sigma, 0.2, 4)
    assert t.shape == (2, 4)
    assert t[1].tolist() == pytest.approx((3.0 * t[0]).tolist(), rel=1e-6)


def test_partition_hand_2x4() -> None:
    # Row 0: mu 0, sigma sqrt(5); row 1: mu 4, sigma sqrt(14). p_uns = 0.25:
    # t1 = sigma * 0.3186394, t2 = sigma * 0.6744898 -> row 0: (0.7125, 1.5082),
    # row 1: (1.1922, 2.5237). |w - mu|: row 0 (1, 1, 3, 3), row 1 (4, 2, 0, 6).
    w = torch.tensor([[1.0, -1.0, 3.0, -3.0], [0.0, 2.0, 4.0, 10.0]])
    for select in ("threshold", "topk"):
        p = partition(w, 0.5, 2, salient_select=select)
        assert p.mu.squeeze(1).tolist() == pytest.approx([0.0, 4.0])
        assert p.sigma.squeeze(1).tolist() == pytest.approx([math.sqrt(5), math.sqrt(14)])
        assert p.thresholds[0].tolist() == pytest.approx([0.712496, 1.508204], rel=1e-5)
        assert p.salient.tolist() == [[False, False, True, True], [True, False, False, True]]
        assert p.ring.dtype == torch.int8
        inl = ~p.salient
        assert p.ring[inl].tolist() == [1, 1, 1, 0]


@pytest.mark.parametrize("n_rings", [1, 2, 4])
def test_ring_shares_on_gaussian(n_rings: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 4096) * 0.02 + 0.001
    p_sal = 0.01
    p_uns = (1 - p_sal) / n_rings
    part = partition(w, p_sal, n_rings, salient_select="threshold")
    sal_share = part.salient.float().mean().item()
    assert abs(sal_share - p_sal) < 0.002
    for k in range(n_rings):
        share = ((part.ring == k) & ~part.salient).float().mean().item()
        assert abs(share - p_uns) < 0.005, (k, share)
    # top-k: every row the same count, round(0.01 * 4096) = 41.
    part_k = partition(w, p_sal, n_rings, salient_select="topk")
    assert part_k.salient_counts.tolist() == [41] * 256
    assert salient_count(p_sal, 4096) == 41


def test_layer_stats_share_one_mu() -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 100) + torch.arange(8).unsqueeze(1)
    mu, sigma = row_stats(w, "layer")
    assert torch.all(mu == mu[0]) and torch.all(sigma == sigma[0])
    assert mu[0].item() == pytest.approx(w.mean().item(), rel=1e-5)


def test_hessian_saliency_picks_low_denominator_column() -> None:
    torch.manual_seed(2)
    w = torch.randn(4, 16)
    mu, _ = row_stats(w)
    d = torch.ones(16)
    d[5] = 1e-3  # column 5 is by far the costliest to get wrong
    part = partition(w, 1 / 16, 1, saliency=saliency_score(w, mu, d))
    assert part.salient[:, 5].all() and part.salient_counts.tolist() == [1] * 4
    part_mag = partition(w, 1 / 16, 1)
    top = (w - mu).abs().argmax(dim=1)
    assert part_mag.salient[torch.arange(4), top].all()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(p_sal=1.0, n_rings=1), "p_sal"),
        (dict(p_sal=-0.1, n_rings=1), "p_sal"),
        (dict(p_sal=0.01, n_rings=0), "n_rings"),
        (dict(p_sal=0.01, n_rings=300), "n_rings"),
        (dict(p_sal=0.01, n_rings=1, stats="col"), "stats"),
        (dict(p_sal=0.01, n_rings=1, salient_select="bitmap"), "salient_select"),
    ],
)
def test_bad_inputs(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        partition(torch.randn(3, 8), **kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(out, in\)"):
        partition(torch.randn(8), 0.01, 1)
    with pytest.raises(ValueError, match="saliency"):
        partition(torch.randn(3, 8), 0.01, 1, saliency=torch.randn(3, 7))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_thresholds(torch.ones(3), 0.01, 1)
