"""Weight-only int8 linears for fast CPU decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusionlm.modules.decoder import TiedLinear


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one fp scale per output channel.

    ``y = (x @ q.T) * scale + bias`` with ``q = round(w / scale)``, ``scale = max|w_row| / 127``.
    The product runs in ``torch._weight_int8pack_mm`` with bf16 activations: on AVX2 CPUs its
    fp32-activation variant is ~10x slower, and bf16 activations cost little accuracy next to
    int8 weights. The output has the input's dtype.

    Args:
        weight: int8 ``[out, in]``.
        scale: ``[out]``.
        bias: ``[out]`` or None.
    """

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(
                f"weight must be int8 [out, in], got {weight.dtype} {tuple(weight.shape)}"
            )
        if scale.shape != weight.shape[:1]:
            raise ValueError(f"scale must be [{weight.shape[0]}], got {tuple(scale.shape)}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """Quantize a float ``[out, in]`` weight symmetrically per output channel.

        The kernel takes bf16 scales, so the scale is rounded to bf16 first (upwards, hence
        the ``1 + 2**-7``: bf16 rounding moves a value by at most 2**-8 of itself) and the
        weights are quantized against exactly the scale used at run time: the error per
        weight stays within half a step.
        """
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0 * (1 + 2**-7)).clamp(min=1e-12).to(torch.bfloat16)
        q = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scale, bias)

    def dequantize(self) -> Tensor:
        """The float weight ``[out, in]`` this layer computes with."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` (and a tied output projection) by an ``Int8Linear``, in place.

    Embedding lookups keep their float table; a tied output head gets its own int8 copy,
    since it streams the whole vocabulary matrix at every decode step.

    Returns:
        ``model``.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear.from_float(child.weight, child.bias))
        output = getattr(module, "output", None)
        if isinstance(output, TiedLinear):
            module.output = Int8Linear.from_float(output.weight)
    return model


__all__ = ["Int8Linear", "quantize_int8"]
