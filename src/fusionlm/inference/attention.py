"""The ``sdpa_cpu`` attention backend: ``sdpa``, with fusionlm's kernel for decode steps.

A decode step's single query over a KV cache is where CPU attention loses time: the fused
SDPA kernel costs ~3 ms per call there and the grouped matmuls read every slot of a
fixed-length cache. ``fusionlm::decode_attention`` (``cpu_kernels``) reads only the keys
the mask allows, so a cache costs what it holds. ``load_model`` picks this backend on CPU
when the kernels build; ``modules/`` never imports this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionlm.inference.cpu_kernels import load_kernels
from fusionlm.modules.attention import register_attention_backend, sdpa_attention
from fusionlm.modules.masks import AttentionMask

BACKEND = "sdpa_cpu"


@register_attention_backend(BACKEND)
def sdpa_cpu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | None,
    is_causal: bool,
    scale: float,
    dropout: float,
) -> Tensor:
    """``sdpa_attention``, except a single query with fp32 CPU tensors, contiguous rows, a
    dense mask or none, and nothing to differentiate: ``fusionlm::decode_attention``."""
    if q.shape[2] == 1 and dropout == 0.0 and decode_kernel_serves(q, k, v, mask):
        return torch.ops.fusionlm.decode_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout=dropout)


def decode_kernel_serves(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> bool:
    """Whether ``fusionlm::decode_attention`` computes this single-query call (see
    ``sdpa_cpu_attention``)."""
    tensors = (q, k, v)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and all(t.stride(-1) == 1 for t in tensors)
        and (mask is None or isinstance(mask, Tensor))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and load_kernels()
    )


__all__ = ["BACKEND", "decode_kernel_serves", "sdpa_cpu_attention"]
