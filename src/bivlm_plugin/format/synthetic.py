"""Random valid ``BinaryCodes`` for tests, kernel checks and benchmarks (no quantizer run).

Non-goals: realistic weight statistics (use ``core.bivlm.quantize_bivlm`` for those).
"""

from __future__ import annotations

import torch

from bivlm_plugin.core.binarize import BinaryCodes, pack_codes

__all__ = ["random_codes"]


def random_codes(
    out_features: int,
    in_features: int,
    n_rings: int = 1,
    k: int = 0,
    scale_mode: str = "row_ring",
    mean_mode: str = "row",
    seed: int = 0,
) -> BinaryCodes:
    """Codes with random signs / rings, exactly ``k`` salient weights per row and fp16 params.

    Scales are ~0.02 * ring (growing outward, as Gaussian rings do) and means ~0.002, so the
    dequantized weight looks like a small linear layer's.
    """
    g = torch.Generator().manual_seed(seed)
    o, i, n = out_features, in_features, n_rings
    signs = torch.rand((o, i), generator=g) < 0.5
    ring = torch.randint(0, n, (o, i), generator=g)
    order = torch.rand((o, i), generator=g).argsort(dim=1)[:, :k]
    salient = torch.zeros((o, i), dtype=torch.bool).scatter_(1, order, True)
    sign2 = torch.rand((o, i), generator=g) < 0.5
    base = 0.02 * (torch.arange(n, dtype=torch.float32) + 1)
    if scale_mode == "row_ring":
        alpha_ring = base * (0.5 + torch.rand((o, n), generator=g))
    else:
        alpha_ring = base * (0.5 + torch.rand((n,), generator=g))
    alpha_sal = 0.05 * (0.5 + torch.rand((o, 2), generator=g)) * torch.tensor([2.0, 0.5])
    m = 1 if mean_mode == "row" else n + 1
    mu = 0.002 * torch.randn((o, m), generator=g)
    return pack_codes(
        signs,
        ring,
        salient,
        sign2,
        alpha_ring.half().float(),
        alpha_sal.half().float(),
        mu.half().float(),
    )
