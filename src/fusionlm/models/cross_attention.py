"""The gated cross-attention layer of Llama 3.2 Vision, shared by every fusion builder."""

from __future__ import annotations

from typing import Literal

from torch import nn

from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.layers import TanhGate, TransformerCrossAttentionLayer
from fusionlm.modules.norm import RMSNorm


def gated_cross_attention_layer(
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    encoder_dim: int,
    mlp: nn.Module,
    norm_eps: float = 1e-5,
    attn_dropout: float = 0.0,
    empty_rows: Literal["skip", "attend_all"] = "skip",
    attn_backend: str = "sdpa",
) -> TransformerCrossAttentionLayer:
    """RMSNorm, attention with RMS-normed queries and keys reading the encoder output, ``mlp``,
    and a ``TanhGate`` on both branches (zero at first, so a fresh layer is the identity).

    Args:
        embed_dim: the decoder's width ``d``.
        num_heads, num_kv_heads, head_dim: the attention's heads.
        encoder_dim: the width of the encoder output it reads.
        mlp: the feed-forward block, ``[d] -> [d]``.
        empty_rows: what a text token that sees no encoder position gets (see
            ``TransformerCrossAttentionLayer``).
    """
    d, h, h_kv, hd = embed_dim, num_heads, num_kv_heads, head_dim
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=h,
        num_kv_heads=h_kv,
        head_dim=hd,
        q_proj=nn.Linear(d, h * hd, bias=False),
        k_proj=nn.Linear(encoder_dim, h_kv * hd, bias=False),
        v_proj=nn.Linear(encoder_dim, h_kv * hd, bias=False),
        output_proj=nn.Linear(h * hd, d, bias=False),
        q_norm=RMSNorm(hd, eps=norm_eps),
        k_norm=RMSNorm(hd, eps=norm_eps),
        is_causal=False,
        attn_dropout=attn_dropout,
        backend=attn_backend,
    )
    return TransformerCrossAttentionLayer(
        attn,
        mlp,
        ca_norm=RMSNorm(d, eps=norm_eps),
        mlp_norm=RMSNorm(d, eps=norm_eps),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
        empty_rows=empty_rows,
    )


__all__ = ["gated_cross_attention_layer"]
