"""Seeded inputs shared by the baseline tests: Laplacian weights and correlated-input Hessians."""

from __future__ import annotations

import pytest
import torch


def make_weight(out: int, n_in: int, seed: int = 0, scale: float = 0.02) -> torch.Tensor:
    """(out, n_in) Laplacian weights (heavier tails than a Gaussian, like LLM weights)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(out, n_in, generator=gen) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs())


def make_hessian(n_in: int, seed: int = 1, n_tokens: int = 1024) -> torch.Tensor:
    """(n_in, n_in) H = 2 X^T X / n of correlated inputs with uneven channel scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + 0.5 * torch.randn(n_in, n_in, generator=gen) / n_in**0.5
    x = torch.randn(n_tokens, n_in, generator=gen) @ mix
    x = x * (0.5 + torch.rand(n_in, generator=gen))
    return 2.0 * x.T @ x / n_tokens


@pytest.fixture
def weight_factory():
    return make_weight


@pytest.fixture
def hessian_factory():
    return make_hessian
