"""Attention backends agree, the registry is extensible, and head pruning is exact (GQA too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlm.inference.cpu_kernels import load_kernels
from fusionlm.modules import masks
from fusionlm.modules.attention import (
    ATTENTION_BACKENDS,
    MultiHeadAttention,
    eager_attention,
    get_attention_backend,
    register_attention_backend,
    sdpa_attention,
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


def single_query_inputs(
    kv_heads: int, head_dim: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[3, 6, 1, head_dim]`` and k, v ``[3, kv_heads, 10, head_dim]``: one decode step of
    three rows."""
    q = torch.randn(3, 6, 1, head_dim)
    return q, torch.randn(3, kv_heads, 10, head_dim), torch.randn(3, kv_heads, 10, head_dim)


@pytest.mark.parametrize("kv_heads", [6, 2, 1])
@pytest.mark.parametrize("mask_shape", [None, (3, 1, 1, 10), (1, 6, 1, 10), (3, 6, 1, 10)])
@pytest.mark.parametrize("head_dim", [8, 40])  # 40: the kernel's 32-wide AVX2 loops and a tail
def test_single_query_kernel_equals_eager(kv_heads, mask_shape, head_dim):
    """A decode step (one query per row) runs ``fusionlm.decode_attention``: the same result as
    the eager reference for every mask broadcast, and zeros for a row with no allowed key."""
    q, k, v = single_query_inputs(kv_heads, head_dim)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.5
    if mask is not None:
        mask[0] = False
    expected = eager_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    actual = sdpa_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    if mask is not None:
        assert (actual[0] == 0).all()


def test_single_query_kernel_never_reads_masked_keys():
    """NaN in every masked key and value: the grouped matmuls spread it (0 * NaN is NaN), the
    kernel does not read those slots at all."""
    q, k, v = single_query_inputs(2, head_dim=40)
    mask = torch.rand(3, 1, 1, 10) > 0.5
    mask[:, :, :, 0] = True
    clean = eager_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    hidden = ~mask[:, 0, 0]  # [3, 10]
    k, v = k.clone(), v.clone()
    k.permute(0, 2, 1, 3)[hidden] = float("nan")
    v.permute(0, 2, 1, 3)[hidden] = float("nan")
    assert (
        eager_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0).isnan().any()
    )
    actual = sdpa_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    torch.testing.assert_close(actual, clean, atol=1e-6, rtol=1e-5)


def test_single_query_with_autograd_takes_the_differentiable_path():
    q, k, v = single_query_inputs(2)
    q.requires_grad_()
    sdpa_attention(q, k, v, mask=None, is_causal=False, scale=0.3, dropout=0.0).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_decode_attention_kernel_refuses_a_mask_that_does_not_fit():
    assert load_kernels()
    q, k, v = single_query_inputs(2)
    with pytest.raises(RuntimeError, match=r"mask must be bool \[1 or b, 1 or h, 1, s\]"):
        torch.ops.fusionlm.decode_attention(q, k, v, torch.ones(3, 1, 1, 9, dtype=torch.bool), 0.3)
    with pytest.raises(RuntimeError, match="do not fit q"):
        torch.ops.fusionlm.decode_attention(q, k[:, :, :, :4], v[:, :, :, :4], None, 0.3)


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
