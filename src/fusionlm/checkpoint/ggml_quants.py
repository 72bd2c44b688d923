"""GGML blocks in torch: dequantization bit-identical to gguf-py's ``gguf.quants``, and the
integer form of the types a weight-only layer computes with as stored.

``DEQUANTIZERS[type](blocks)`` maps uint8 blocks ``[n, type_size]`` to float32 values
``[n, block_size]`` (sizes in ``gguf.GGML_QUANT_SIZES``). ``AFFINE[type](blocks)`` gives the
same values as ``(q, scale, offset)`` per group of 32 (see below): ``scale * q + offset`` (two
fp32 operations, in that order) is bit-identical to the dequantized value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType
from torch import Tensor

Q = GGMLQuantizationType

# Each kernel maps uint8 blocks [n, type_size] to float32 values [n, block_size], mirroring
# gguf.quants operation for operation (fp32 rounding included) so results match it exactly;
# the in-place forms in the common types save a pass over memory each.


def _half(raw: Tensor) -> Tensor:
    """[n, 2] uint8 -> [n, 1] float16."""
    return raw.contiguous().view(torch.float16)


def _f16(raw: Tensor) -> Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return _half(raw).float()


def _u8(values: list[int], *shape: int) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(*shape)


_NIBBLES = _u8([0, 4], 1, 2, 1)
_CRUMBS = _u8([0, 2, 4, 6], 1, 4, 1)
_BITS = _u8(list(range(8)), 1, 8, 1)


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """[n, k] packed -> [n, k // group, 2, group]: low nibbles of a group, then high nibbles."""
    qs = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _bits(qh: Tensor) -> Tensor:
    """[n, k] -> [n, 8 * k] little-endian bits (bit i of the bytes read as one integer)."""
    return ((qh.unsqueeze(-1) >> _BITS.view(1, 1, 8)) & 1).reshape(qh.shape[0], -1)


def _dq_f32(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float32)


def _dq_f16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.float16)


def _dq_bf16(b: Tensor) -> Tensor:
    return b.contiguous().view(torch.bfloat16)


def _dq_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _dq_q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32).view(torch.int8) - 8
    return q.float().mul_(_f16(b[:, :2]))


def _dq_q4_1(b: Tensor) -> Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(-1, 32).float()
    return q.mul_(_f16(b[:, :2])).add_(_f16(b[:, 2:4]))


def _q5(ql: Tensor, qh: Tensor) -> Tensor:
    return _nibbles(ql, 16).reshape(-1, 32) | (_bits(qh) << 4)


def _dq_q5_0(b: Tensor) -> Tensor:
    q = _q5(b[:, 6:], b[:, 2:6]).view(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _dq_q5_1(b: Tensor) -> Tensor:
    q = _q5(b[:, 8:], b[:, 4:8]).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _dq_q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> _CRUMBS) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def _dq_q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (scales[:, :8].reshape(n, 1, 8) >> _NIBBLES.view(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _CRUMBS.view(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 3) << 4)).view(torch.int8) - 32
    dl = (d * sc.float()).view(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _CRUMBS) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _BITS) & 1).reshape(n, 16, 16) ^ 1
    q = (ql.view(torch.int8) - (qh << 2).view(torch.int8)).float()
    return (dl * q).view(n, 256)


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins, each [n, 8]."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, offset) per 32 values, [n, 8, 1] each, of a Q4_K/Q5_K block."""
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).view(n, 8, 1)
    return d, dm


def _dq_q4_k(b: Tensor) -> Tensor:
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:], 32).reshape(-1, 8, 32).float()
    return q.mul_(d).sub_(dm).view(-1, 256)


def _dq_q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _BITS) & 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).view(n, 256)


def _dq_q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales, d = b[:, 192:208].view(torch.int8), _f16(b[:, 208:210])
    d = (d * scales.float()).view(n, 16, 1)
    low = _nibbles(ql, 64).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _CRUMBS) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).view(n, 256)


# The affine forms: q, and scale and offset [n, block / 32] (offset None for Q8_0), where q
# is int8 [n, block] for Q8_0 and, for the 4-bit types, bytes [n, block / 2] holding two values
# each in Q4_0's order: per group of 32, value j in the low nibble of byte j and value j + 16
# in its high nibble (Q4_0 and Q4_1 blocks already hold exactly these bytes; Q4_K's, which
# pair value j with j + 32, are repacked). Every product scale * q is exact in fp32 (an f16
# scale, or Q4_K's f16 x 6-bit scale, times a 4-bit value), and so is Q4_0's
# d * q - 8 * d = d * (q - 8): only Q4_1 and Q4_K round once, in their additions, as the
# dequantizers do. Offsets stay fp16 where the block stores them so (Q4_1's m, and Q4_0's
# -8 * d, exact in fp16 too): the kernels read them a vector at a time, where widening is
# free, and they are an eighth of a layer's bytes in fp32. Q4_K's (f16 x 6-bit) are fp32.


def _affine_q8_0(b: Tensor) -> tuple[Tensor, Tensor, None]:
    return b[:, 2:].view(torch.int8).clone(), _f16(b[:, :2]), None


def _affine_q4_0(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = _half(b[:, :2])
    return b[:, 2:].clone(), d.float(), d * -8.0


def _affine_q4_1(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return b[:, 4:].clone(), _f16(b[:, :2]), _half(b[:, 2:4])


def _affine_q4_k(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = b.shape[0]
    d, dm = _k_scales(b)
    # Per 64 values, 32 bytes: value j (low nibble) and value j + 32 (high) in byte j.
    pairs = b[:, 16:].reshape(n, 4, 2, 16)
    first, second = pairs[:, :, 0], pairs[:, :, 1]  # bytes j and j + 16 of a chunk
    low = (first & 0x0F) | (second << 4)  # values j, j + 16: the chunk's first 32
    high = (first >> 4) | (second & 0xF0)  # values 32 + j, 48 + j: its last 32
    return torch.stack([low, high], dim=2).reshape(n, 128), d.view(n, 8), -dm.view(n, 8)


AFFINE: dict[GGMLQuantizationType, Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]] = {
    Q.Q8_0: _affine_q8_0,
    Q.Q4_0: _affine_q4_0,
    Q.Q4_1: _affine_q4_1,
    Q.Q4_K: _affine_q4_k,
}


DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[Tensor], Tensor]] = {
    Q.F32: _dq_f32,
    Q.F16: _dq_f16,
    Q.BF16: _dq_bf16,
    Q.Q8_0: _dq_q8_0,
    Q.Q4_0: _dq_q4_0,
    Q.Q4_1: _dq_q4_1,
    Q.Q5_0: _dq_q5_0,
    Q.Q5_1: _dq_q5_1,
    Q.Q2_K: _dq_q2_k,
    Q.Q3_K: _dq_q3_k,
    Q.Q4_K: _dq_q4_k,
    Q.Q5_K: _dq_q5_k,
    Q.Q6_K: _dq_q6_k,
}


__all__ = ["AFFINE", "DEQUANTIZERS"]
