"""w8a8 linears: int8 weights times activations rounded to int8 on the fly, as llama.cpp's
Q8_0 dot products compute."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.inference.cpu_kernels import INT8_GROUP_SIZE, W8A8_CHANNEL_BLOCK, load_kernels

CHANNEL_BLOCK = W8A8_CHANNEL_BLOCK
STEP = 4
"""Consecutive inputs of one channel side by side in a packed block."""
REFERENCE_ROWS = 1024
"""Weight rows the PyTorch reference multiplies at a time (bounds its temporaries)."""


def pack_w8a8(weight: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """An int8 weight ``[n, k]`` and its scales ``[n, k / 32]`` (as an int8 ``WeightOnlyLinear``
    or a Q8_0 tensor holds them) in the order ``fusionlm::linear_w8a8`` reads: weight
    ``[n / 16, k / 32, 512]``, where block ``b``, group ``g`` holds 8 steps of 16 channels x 4
    consecutive inputs, and scale ``[n / 16, k / 32, 16]``. The same values, reordered.

    Raises:
        ValueError: ``n`` not a multiple of 16, ``k`` not of 32, or scales of another shape.
    """
    n, k = weight.shape
    if weight.dtype != torch.int8 or n % CHANNEL_BLOCK or k % INT8_GROUP_SIZE:
        raise InvalidInputError(
            f"w8a8 weights need int8 [out, in] with out divisible by {CHANNEL_BLOCK} and in by "
            f"{INT8_GROUP_SIZE}, got {weight.dtype} {tuple(weight.shape)}; use int8 for this model"
        )
    blocks, groups = n // CHANNEL_BLOCK, k // INT8_GROUP_SIZE
    if tuple(scale.shape) != (n, groups):
        raise InvalidInputError(
            f"w8a8 weights need a scale of shape {[n, groups]}, got {scale.shape}"
        )
    steps = INT8_GROUP_SIZE // STEP
    packed = weight.view(blocks, CHANNEL_BLOCK, groups, steps, STEP).permute(0, 2, 3, 1, 4)
    scales = scale.float().view(blocks, CHANNEL_BLOCK, groups).permute(0, 2, 1)
    return {
        "weight": packed.reshape(blocks, groups, CHANNEL_BLOCK * INT8_GROUP_SIZE).contiguous(),
        "scale": scales.contiguous(),
    }


class W8A8Linear(nn.Module):
    """A linear layer with int8 weights (one scale per 32 inputs) whose inputs are rounded to
    int8 too, per row and group of 32 (``scale = max|x| / 127``, ties to even), each group's
    dot product summed exactly in int32: the arithmetic of llama.cpp's Q8_0 files.

    AVX-512 VNNI multiplies four times as many pairs an instruction as fp32 multiply-adds, so
    where a decode step's few rows are bound by arithmetic (a server's batch) this runs several
    times faster than int8 weights with fp32 activations; a lone row streams the weights at
    the same speed. The price is precision: on the default model, 10 prompts x 32 greedy tokens
    agree with fp32 on fewer tokens than weight-only int8 (see the README). Each row's result
    depends on that row alone, and prompts and decode steps compute alike.

    ``forward`` runs ``fusionlm::linear_w8a8`` (or, without the kernels, the same math in
    PyTorch, summed in another order). For inference: the weight is a buffer.

    Args:
        weight: packed int8 ``[out / 16, in / 32, 512]`` (``pack_w8a8``).
        scale: fp32 ``[out / 16, in / 32, 16]``.
        bias: ``[out]`` or None.

    Raises:
        ValueError: a weight or scale of another dtype or shape.
    """

    format = "w8a8"

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        block_bytes = CHANNEL_BLOCK * INT8_GROUP_SIZE
        if weight.dim() != 3 or weight.dtype != torch.int8 or weight.shape[2] != block_bytes:
            raise InvalidInputError(
                f"w8a8 weights must be packed int8 [out / 16, in / 32, {block_bytes}] "
                f"(pack_w8a8), got {weight.dtype} {tuple(weight.shape)}"
            )
        expected = (weight.shape[0], weight.shape[1], CHANNEL_BLOCK)
        if tuple(scale.shape) != expected:
            raise InvalidInputError(
                f"w8a8 weights need a scale of shape {list(expected)}, got {tuple(scale.shape)}"
            )
        self.out_features = weight.shape[0] * CHANNEL_BLOCK
        self.in_features = weight.shape[1] * INT8_GROUP_SIZE
        self.streaming = load_kernels()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def int8_weight(self, rows: Tensor | slice | None = None) -> tuple[Tensor, Tensor]:
        """The int8 weight ``[out, in]`` and its scales ``[out, in / 32]`` (or only ``rows``),
        unpacked."""
        blocks, groups = self.weight.shape[:2]
        steps = INT8_GROUP_SIZE // STEP
        by_channel = self.weight.view(blocks, groups, steps, CHANNEL_BLOCK, STEP).permute(
            0, 3, 1, 2, 4
        )
        scales = self.scale.permute(0, 2, 1)  # [blocks, 16, groups]
        if rows is None:
            return (
                by_channel.reshape(self.out_features, self.in_features),
                scales.reshape(self.out_features, groups),
            )
        index = rows if isinstance(rows, Tensor) else torch.arange(self.out_features)[rows]
        block, lane = index // CHANNEL_BLOCK, index % CHANNEL_BLOCK
        return (
            by_channel[block, lane].reshape(-1, self.in_features),
            scales[block, lane].reshape(-1, groups),
        )

    def dequantize(self, rows: Tensor | slice | None = None) -> Tensor:
        """The fp32 weight ``[out, in]`` (or only ``rows``: ``[len(rows), in]``).

        With the kernels, through ``fusionlm::dequantize``, as ``WeightOnlyLinear``'s: the
        same numbers (one multiply each) in one pass."""
        values, scales = self.int8_weight(rows)
        if self.streaming:
            return torch.ops.fusionlm.dequantize(values.contiguous(), scales.contiguous(), None)
        groups = values.view(values.shape[0], -1, INT8_GROUP_SIZE).float() * scales[..., None]
        return groups.view(values.shape[0], self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if self.streaming:
            (y,) = torch.ops.fusionlm.linear_w8a8(flat, [self.weight], [self.scale])
        else:
            y = self.reference(flat)
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def reference(self, x: Tensor) -> Tensor:
        """``x [m, in] -> [m, out]`` in PyTorch: the kernel's integer sums exactly, its fp32
        sum over groups in another order."""
        groups = x.view(x.shape[0], -1, INT8_GROUP_SIZE)
        x_scale = groups.abs().amax(dim=-1) / 127.0  # [m, groups]
        inverse = torch.where(x_scale > 0, 1.0 / x_scale, 0.0)
        x_values = (groups * inverse[..., None]).round().clamp(-127, 127)
        y = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, REFERENCE_ROWS):
            rows = slice(start, start + REFERENCE_ROWS)
            values, scales = self.int8_weight(rows)
            w_values = values.view(values.shape[0], -1, INT8_GROUP_SIZE).float()
            sums = torch.einsum("mgj,ngj->mng", x_values, w_values)  # exact: < 2**24
            y[:, rows] = (sums * (scales[None] * x_scale[:, None])).sum(dim=-1)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, bias={self.bias is not None}"
        )


__all__ = ["CHANNEL_BLOCK", "W8A8Linear", "pack_w8a8"]
