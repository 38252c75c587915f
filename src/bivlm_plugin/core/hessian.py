"""Hessian accumulation from layer inputs and its damped inverse Cholesky factor.

For a linear layer y = x W^T the layer-wise reconstruction loss ||X W^T - X W_hat^T||^2 has the
Hessian H = 2 X^T X / n (in x in). This is the same proxy GPTQ, BiLLM and ARB-LLM use.
"""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "inverse_cholesky"]


class HessianAccumulator:
    """Running estimate of H = 2 / n * sum_i x_i x_i^T over calibration tokens.

    Args:
        in_features: width of the layer input.
        device: where H lives (float32 always: fp16 sums overflow on real activations).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold a batch of layer inputs into H.

        Args:
            x: (..., in_features) activations, any float dtype.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input width {x.shape[-1]} does not match in_features={self.in_features}"
            )
        x = x.reshape(-1, self.in_features).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.n_tokens + n
        # Running mean keeps H on the same scale whatever the number of tokens.
        self.hessian.mul_(self.n_tokens / total)
        self.hessian.addmm_(x.t(), x, alpha=2.0 / total)
        self.n_tokens = total


def inverse_cholesky(
    hessian: torch.Tensor, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp H, invert it, and return the upper Cholesky factor of H^-1 (GPTQ's ``Hinv``).

    Dead inputs (zero diagonal) get a unit diagonal so the factor exists; their weights can then
    be zeroed by the caller since they never influence the output.

    Args:
        hessian: (in, in) float32 symmetric positive semi-definite.
        percdamp: damping as a share of the mean diagonal.

    Returns:
        (hinv_upper, dead): (in, in) float32 upper-triangular U with U^T U = (H + lambda I)^-1,
        and a bool (in,) mask of dead inputs.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square (in, in), got shape {tuple(hessian.shape)}")
    if not 0.0 <= percdamp < 1.0:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        try:
            h_try = h.clone()
            h_try[idx, idx] += damp * (10.0**attempt)
            chol = torch.linalg.cholesky(h_try)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True), dead
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(
        "Hessian is not positive definite even with 1e5x damping; the calibration inputs are "
        "degenerate (all zeros or NaN?). Check the calibration data or raise percdamp."
    )
