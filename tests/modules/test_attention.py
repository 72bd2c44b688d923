"""Attention backends agree, the registry is extensible, and head pruning is exact (GQA too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlm.modules import masks
from fusionlm.modules.attention import (
    ATTENTION_BACKENDS,
    MultiHeadAttention,
    eager_attention,
    get_attention_backend,
    register_attention_backend,
)


def attention(
    num_heads: int, num_kv_heads: int, *, backend: str = "sdpa", head_dim: int = 8
) -> MultiHeadAttention:
    d = 32
    return MultiHeadAttention(
        embed_dim=d,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(d, num_heads * head_dim),
        k_proj=nn.Linear(d, num_kv_heads * head_dim),
        v_proj=nn.Linear(d, num_kv_heads * head_dim),
        output_proj=nn.Linear(num_heads * head_dim, d),
        backend=backend,
    ).eval()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_backends_equal_eager(backend, kv_heads):
    q, k, v = (
        torch.randn(2, 6, 9, 8),
        torch.randn(2, kv_heads, 9, 8),
        torch.randn(2, kv_heads, 9, 8),
    )
    keep = torch.rand(2, 9) > 0.3
    mask = masks.to_bool_mask(
        masks.and_masks(masks.causal(), masks.padding(keep)), batch_size=2, q_len=9, kv_len=9
    )
    for m, causal in ((None, True), (None, False), (mask, False)):
        expected = eager_attention(q, k, v, mask=m, is_causal=causal, scale=0.3, dropout=0.0)
        actual = ATTENTION_BACKENDS[backend](
            q, k, v, mask=m, is_causal=causal, scale=0.3, dropout=0.0
        )
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_users_can_register_a_backend_and_duplicates_fail():
    calls = []

    @register_attention_backend("test-counting")
    def counting(q, k, v, *, mask, is_causal, scale, dropout):
        calls.append(q.shape)
        return eager_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, dropout=dropout
        )

    try:
        attn = attention(4, 2, backend="test-counting")
        x = torch.randn(1, 5, 32)
        attn(x, x, input_pos=None)
        assert calls == [torch.Size([1, 4, 5, 8])]
        with pytest.raises(ValueError, match="already registered"):
            register_attention_backend("test-counting")(counting)
    finally:
        del ATTENTION_BACKENDS["test-counting"]
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_attention_backend("nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(4, 2, backend="nope")


def zero_heads(attn: MultiHeadAttention, heads: list[int]) -> MultiHeadAttention:
    """The same layer with the output columns of ``heads`` zeroed: those heads contribute nothing."""
    zeroed = attention(attn.num_heads, attn.num_kv_heads)
    zeroed.load_state_dict(attn.state_dict())
    with torch.no_grad():
        for h in heads:
            zeroed.output_proj.weight[:, h * 8 : (h + 1) * 8] = 0
    return zeroed


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "rounds"),
    [
        (6, 6, [[1, 4]]),  # MHA
        (6, 2, [[0]]),  # GQA, uneven groups afterwards
        (6, 2, [[3, 4, 5]]),  # GQA, a whole group (and its kv head) removed
        (6, 3, [[1], [0, 5]]),  # GQA over two rounds, original numbering
        (6, 1, [[2, 3]]),  # MQA
    ],
)
def test_pruned_heads_equal_zeroed_heads(num_heads, num_kv_heads, rounds):
    attn = attention(num_heads, num_kv_heads)
    reference = zero_heads(attn, [h for r in rounds for h in r])
    x = torch.randn(2, 7, 32)
    for heads in rounds:
        attn.prune_heads(heads)
    pruned = sum(len(r) for r in rounds)
    assert attn.num_heads == num_heads - pruned
    assert attn.q_proj.out_features == attn.num_heads * 8
    assert attn.k_proj.out_features == attn.num_kv_heads * 8
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x), reference(x, x), atol=1e-6, rtol=0)


def test_pruning_a_whole_group_drops_its_kv_head():
    attn = attention(6, 3)
    attn.prune_heads([2, 3])
    assert attn.num_kv_heads == 2 and attn.kv_head_of_query is None
    attn.prune_heads([0])
    assert attn.num_kv_heads == 2 and attn.kv_head_of_query.tolist() == [0, 1, 1]


def test_pruning_errors():
    attn = attention(4, 2)
    with pytest.raises(ValueError, match="out of range"):
        attn.prune_heads([4])
    with pytest.raises(ValueError, match="every head"):
        attn.prune_heads([0, 1, 2, 3])
    attn.setup_cache(1, torch.float32)
    with pytest.raises(RuntimeError, match="before setting up the KV cache"):
        attn.prune_heads([0])


def test_cross_attention_reads_cached_keys_when_y_is_none():
    d = 32
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        q_proj=nn.Linear(d, 32),
        k_proj=nn.Linear(d, 16),
        v_proj=nn.Linear(d, 16),
        output_proj=nn.Linear(32, d),
        is_causal=False,
    ).eval()
    x, y = torch.randn(1, 3, d), torch.randn(1, 5, d)
    expected = attn(x, y)
    with pytest.raises(ValueError, match="needs y"):
        attn(x)
    attn.setup_cache(1, torch.float32, max_seq_len=5)
    torch.testing.assert_close(attn(x, y), expected)
    torch.testing.assert_close(attn(x), expected)
