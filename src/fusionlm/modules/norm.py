"""Root-mean-square layer normalisation."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): ``x / rms(x) * weight``.

    The statistics are computed in float32 and the result is cast back to the input
    dtype before the weight is applied, exactly as transformers' ``LlamaRMSNorm`` does,
    so bf16 models match the reference bit for bit.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square for numerical stability.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim] -> [..., dim]``, same dtype as ``x``."""
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
