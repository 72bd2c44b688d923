"""Weight-only bf16 and int8 linears: smaller weights, fp32 math, fast CPU decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.inference.cpu_kernels import INT8_GROUP_SIZE, MATVEC_MAX_ROWS, load_kernels
from fusionlm.inference.weight_formats import WEIGHT_FORMATS
from fusionlm.modules.decoder import TiedLinear

INT8_KERNEL_MAX_ROWS = 128
"""int8 layers run fusionlm's kernel up to this many rows, a prompt's chunk included: widening
int8 inside the kernel beats dequantizing the whole weight for one BLAS call up to here
(measured, [m, 576] x [1536, 576]: 2.2 vs 5.2 ms at 128 rows, 4.7 vs 4.0 ms at 256). bf16
layers stop at ``MATVEC_MAX_ROWS``: their BLAS call is faster from ~40 rows on."""
QUANTIZE_ROWS = 2048
"""Rows quantized at a time (bounds the float temporaries to a few MB per block)."""


def _check_int8_width(in_features: int) -> None:
    if in_features % INT8_GROUP_SIZE:
        raise ValueError(
            f"int8 weights need in_features divisible by {INT8_GROUP_SIZE}, got {in_features}; "
            "use bf16 for this model"
        )


class WeightOnlyLinear(nn.Module):
    """A linear layer that stores its weight in bf16, or in int8 with one scale per 32 inputs
    (llama.cpp's Q8_0 layout), and computes in fp32.

    ``y = x @ W.T + bias`` with ``W = dequantize()``. Only the stored weight loses precision,
    never the activations. On the default model, 10 prompts x 32 greedy tokens agree with
    fp32 on 320 of 320 tokens with bf16 weights, 294 with int8 weights, but 176 when the
    activations entering each linear are rounded to bf16 as well. Up to
    ``MATVEC_MAX_ROWS`` rows run in ``cpu_kernels``' streaming kernels (built when the
    first layer is made; without them, as with more rows, the product is one fp32 GEMM on
    the dequantized weight). The output has the input's dtype. For inference: the weight is
    a buffer, and the kernels have no backward.

    Args:
        weight: bf16 or int8 ``[out, in]``.
        scale: for int8 weights, fp32 ``[out, in / 32]``; None for bf16.
        bias: ``[out]`` or None.

    Raises:
        ValueError: another weight dtype, or a scale that does not fit the weight.
    """

    def __init__(self, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.int8):
            raise ValueError(
                f"weight must be bf16 or int8 [out, in], got {weight.dtype} {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape
        if weight.dtype == torch.int8:
            _check_int8_width(in_features)
            expected = (out_features, in_features // INT8_GROUP_SIZE)
            if scale is None or tuple(scale.shape) != expected:
                got = None if scale is None else tuple(scale.shape)
                raise ValueError(f"int8 weights need a scale of shape {list(expected)}, got {got}")
            scale = scale.float().contiguous()
        elif scale is not None:
            raise ValueError("bf16 weights take no scale")
        self.in_features, self.out_features = in_features, out_features
        self.streaming = load_kernels()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None = None, *, format: str
    ) -> WeightOnlyLinear:
        """A layer computing with ``weight`` stored in ``format`` (see ``weight_in_format``).

        Raises:
            ValueError: an unknown ``format``; int8 with ``in`` not a multiple of 32.
        """
        return cls(*weight_in_format(weight, format=format), bias)

    @property
    def format(self) -> str:
        """``"bf16"`` or ``"int8"``."""
        return "bf16" if self.weight.dtype == torch.bfloat16 else "int8"

    def dequantize(self) -> Tensor:
        """The fp32 weight ``[out, in]`` this layer computes with."""
        if self.scale is None:
            return self.weight.float()
        groups = self.weight.view(self.out_features, -1, INT8_GROUP_SIZE).float()
        return (groups * self.scale[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        flat = x.reshape(-1, self.in_features).float()
        max_rows = MATVEC_MAX_ROWS if self.scale is None else INT8_KERNEL_MAX_ROWS
        if flat.shape[0] > max_rows or not self.streaming:
            y = F.linear(flat, self.dequantize())
        elif self.scale is None:
            (y,) = torch.ops.fusionlm.linear_bf16(flat, [self.weight])
        else:
            (y,) = torch.ops.fusionlm.linear_int8(flat, [self.weight], [self.scale])
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, bias={self.bias is not None}"
        )


def weight_in_format(weight: Tensor, *, format: str) -> tuple[Tensor, Tensor | None]:
    """A float ``[out, in]`` weight as ``WeightOnlyLinear`` stores it: rounded to bf16 (no
    scale), or int8 quantized symmetrically per group of 32 inputs with fp32 scales
    ``[out, in / 32]`` (``scale = max|w| / 127`` over the group, so every weight is off by
    at most half a step).

    Raises:
        ValueError: an unknown ``format``; int8 with ``in`` not a multiple of 32.
    """
    if format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {format!r}; choose one of {WEIGHT_FORMATS}")
    w = weight.detach()
    if format == "bf16":
        return w.bfloat16(), None
    out_features, in_features = w.shape
    _check_int8_width(in_features)
    if w.is_meta:  # the layers' structure only, for a loader that assigns weights next
        return (
            torch.empty(w.shape, dtype=torch.int8, device="meta"),
            torch.empty(out_features, in_features // INT8_GROUP_SIZE, device="meta"),
        )
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(out_features, in_features // INT8_GROUP_SIZE)
    # In blocks of rows, so the float temporaries stay small beside a large matrix.
    for start in range(0, out_features, QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        groups = w[rows].float().view(-1, in_features // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
        scale[rows] = (groups.abs().amax(dim=-1) / 127.0).clamp_(min=1e-12)
        scaled = groups / scale[rows, :, None]
        q[rows] = scaled.round_().clamp_(-127, 127).view(-1, in_features).to(torch.int8)
    return q, scale


def linear_weights_in_format(name: str, tensor: Tensor, *, format: str) -> dict[str, Tensor]:
    """One checkpoint tensor as ``quantize(model, format)`` stores it: a linear layer's
    weight (any 2-D ``*.weight`` but the token embedding) becomes ``name`` in ``format``
    plus its ``*.scale`` for int8; every other tensor stays as it is. Lets a loader convert
    each tensor as it reads it, never holding the whole float model."""
    if tensor.dim() != 2 or not name.endswith(".weight") or name == "tok_embeddings.weight":
        return {name: tensor}
    weight, scale = weight_in_format(tensor, format=format)
    converted = {name: weight}
    if scale is not None:
        converted[name.removesuffix("weight") + "scale"] = scale
    return converted


def quantize(model: nn.Module, format: str) -> nn.Module:
    """Replace every ``nn.Linear`` (and a tied output projection) by a ``WeightOnlyLinear`` of
    ``format`` (``"bf16"`` or ``"int8"``), in place.

    Embedding lookups keep their float table; a tied output head gets its own copy, since it
    streams the whole vocabulary matrix at every decode step.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown format, or (int8) a layer whose input width is not a multiple
            of 32.
    """
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                replacement = WeightOnlyLinear.from_float(child.weight, child.bias, format=format)
                setattr(module, child_name, replacement)
        output = getattr(module, "output", None)
        if isinstance(output, TiedLinear):
            module.output = WeightOnlyLinear.from_float(output.weight, format=format)
    return model


__all__ = [
    "WEIGHT_FORMATS",
    "WeightOnlyLinear",
    "linear_weights_in_format",
    "quantize",
    "weight_in_format",
]
