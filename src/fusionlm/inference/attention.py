"""The ``sdpa_cpu`` attention backend: ``sdpa``, with fusionlm's kernel for decode steps and
short prompts.

A decode step's single query over a KV cache is where CPU attention loses time: the fused
SDPA kernel costs ~3 ms per call there and the grouped matmuls read every slot of a
fixed-length cache. ``fusionlm::decode_attention`` (``cpu_kernels``) reads only the keys
the mask allows, so a cache costs what it holds; on a short prompt chunk it also costs about
half of SDPA's fused kernel, whose fixed cost dominates there. ``load_model`` picks this
backend on CPU when the kernels build; ``modules/`` never imports this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusionlm.inference.cpu_kernels import load_kernels
from fusionlm.modules.attention import register_attention_backend, sdpa_attention
from fusionlm.modules.masks import AttentionMask, causal, to_bool_mask

BACKEND = "sdpa_cpu"
KERNEL_MAX_SCORES = 64 * 64
"""Prompt chunks of at most this many query-key pairs run in ``fusionlm::decode_attention``,
larger ones in SDPA's fused kernel. Causal, 9 query heads over 3 key/value heads of 64
channels, two threads, kernel against SDPA: 37 x 37 41 vs 79 us, 64 x 64 101 vs 116, 128 x 128
388 vs 349, 256 queries over 1024 keys 7.2 vs 4.4 ms."""


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
    """``sdpa_attention``, except a single query, or a prompt chunk of at most
    ``KERNEL_MAX_SCORES`` query-key pairs, with fp32 CPU queries (keys and values fp32 or
    fp16), contiguous rows, a dense mask or none, and nothing to differentiate:
    ``fusionlm::decode_attention``."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if (
        (q_len == 1 or q_len * kv_len <= KERNEL_MAX_SCORES)
        and dropout == 0.0
        and decode_kernel_serves(q, k, v, mask)
    ):
        if mask is None and is_causal and q_len > 1:  # query i sees keys 0..i, as SDPA's
            mask = to_bool_mask(causal(), batch_size=1, q_len=q_len, kv_len=kv_len)
        return torch.ops.fusionlm.decode_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout=dropout)


def decode_kernel_serves(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> bool:
    """Whether ``fusionlm::decode_attention`` can compute this call (see
    ``sdpa_cpu_attention``)."""
    tensors = (q, k, v)
    return (
        all(t.device.type == "cpu" for t in tensors)
        and q.dtype == torch.float32
        and k.dtype == v.dtype in (torch.float32, torch.float16)
        and all(t.stride(-1) == 1 for t in tensors)
        and (mask is None or isinstance(mask, Tensor))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and load_kernels()
    )


__all__ = ["BACKEND", "KERNEL_MAX_SCORES", "decode_kernel_serves", "sdpa_cpu_attention"]
