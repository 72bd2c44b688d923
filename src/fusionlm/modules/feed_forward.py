"""The feed-forward block: gated (Llama's SwiGLU) or plain two-layer (ViT's GELU MLP)."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """``w2(act(w1(x)) * w3(x))``: SwiGLU when ``activation`` is SiLU (the default).

    Without ``up_proj`` the block is the plain MLP ``w2(act(w1(x)))`` of vision transformers.

    Args:
        gate_proj: ``w1``, ``[d] -> [hidden]``, passed through the activation.
        down_proj: ``w2``, ``[hidden] -> [d]``.
        up_proj: ``w3``, ``[d] -> [hidden]``, multiplies the gate; None for an ungated MLP.
        activation: elementwise nonlinearity on the gate.
    """

    def __init__(
        self,
        *,
        gate_proj: nn.Module,
        down_proj: nn.Module,
        up_proj: nn.Module | None = None,
        activation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.w1 = gate_proj
        self.w2 = down_proj
        self.w3 = up_proj
        self.activation = activation if activation is not None else nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, d] -> [b, s, d]``."""
        h = self.activation(self.w1(x))
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)


__all__ = ["FeedForward"]
