"""The ``sdpa_cpu`` backend: fusionlm's decode-attention kernel for single queries."""

from __future__ import annotations

import pytest
import torch

from fusionlm.inference.attention import KERNEL_MAX_SCORES, sdpa_cpu_attention
from fusionlm.inference.cpu_kernels import load_kernels
from fusionlm.modules import masks
from fusionlm.modules.attention import eager_attention, get_attention_backend

pytestmark = pytest.mark.usefixtures("kernels")


@pytest.mark.parametrize("length", [9, 65])  # 9 x 9: the kernel; 65 x 65: SDPA's fused one
def test_prompts_equal_eager_and_the_backend_is_registered(length):
    assert (length * length <= KERNEL_MAX_SCORES) == (length == 9)
    q = torch.randn(2, length, 6, 8).transpose(1, 2)  # strided as a layer's queries are
    k, v = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    keep = torch.rand(2, length) > 0.3
    mask = masks.to_bool_mask(
        masks.and_masks(masks.causal(), masks.padding(keep)),
        batch_size=2,
        q_len=length,
        kv_len=length,
    )
    backend = get_attention_backend("sdpa_cpu")
    for m, causal in ((None, True), (mask, False)):
        expected = eager_attention(q, k, v, mask=m, is_causal=causal, scale=0.3, dropout=0.0)
        actual = backend(q, k, v, mask=m, is_causal=causal, scale=0.3, dropout=0.0)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_a_prompt_query_gets_what_it_gets_in_any_chunk():
    """A chunk of queries over a cache: each query's numbers are those it gets alone, as one
    query over the keys it may see (a prompt prefilled whole, in chunks, or after a reused
    prefix gives the same keys and values)."""
    q = torch.randn(1, 7, 9, 16).transpose(1, 2)  # 7 queries, the last 7 of 12 slots
    k, v = torch.randn(1, 3, 12, 16), torch.randn(1, 3, 12, 16)
    chunk = masks.to_bool_mask(masks.causal(), batch_size=1, q_len=7, kv_len=12, q_offset=5)
    together = sdpa_cpu_attention(q, k, v, mask=chunk, is_causal=False, scale=0.3, dropout=0.0)
    for i in range(7):
        alone = sdpa_cpu_attention(
            q[:, :, i : i + 1],
            k,
            v,
            mask=chunk[:, :, i : i + 1],
            is_causal=False,
            scale=0.3,
            dropout=0.0,
        )
        assert torch.equal(alone, together[:, :, i : i + 1])


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
    """A decode step (one query per row) runs ``fusionlm::decode_attention``: the same result as
    the eager reference for every mask broadcast, and zeros for a row with no allowed key."""
    q, k, v = single_query_inputs(kv_heads, head_dim)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.5
    if mask is not None:
        mask[0] = False
    expected = eager_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    actual = sdpa_cpu_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    if mask is not None:
        assert (actual[0] == 0).all()


def test_heads_that_share_keys_get_what_they_get_alone():
    """Rows of 9 heads over 3 key/value heads (the default model's): with tasks enough for
    every thread (32 rows for up to 24 threads), a task takes a row's 3 heads that share keys,
    values and slots at once; a row alone is attended one head at a time. Every row's numbers
    are the same either way, and match eager."""
    q, k, v = torch.randn(32, 9, 1, 72), torch.randn(32, 3, 40, 72), torch.randn(32, 3, 40, 72)
    mask = torch.rand(32, 1, 1, 40) > 0.3
    mask[0] = False
    together = sdpa_cpu_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    expected = eager_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)
    for row in range(32):
        q1, k1, v1, mask1 = (t[row : row + 1] for t in (q, k, v, mask))
        alone = sdpa_cpu_attention(q1, k1, v1, mask=mask1, is_causal=False, scale=0.3, dropout=0.0)
        assert torch.equal(alone, together[row : row + 1])


@pytest.mark.parametrize("queries", [1, 5])  # a decode step; a prompt chunk
def test_fp16_keys_and_values_give_fp32_attention_over_their_values(queries):
    """A float16 KV cache: the kernel reads fp16 keys and values (fp32 queries, sums and
    output), which gives what fp32 attention gives on the same rounded values."""
    q = torch.randn(3, queries, 6, 40).transpose(1, 2)
    k, v = torch.randn(3, 2, 10, 40).half(), torch.randn(3, 2, 10, 40).half()
    mask = torch.rand(3, 1, queries, 10) > 0.3
    mask[..., 0] = True
    actual = sdpa_cpu_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    expected = eager_attention(
        q, k.float(), v.float(), mask=mask, is_causal=False, scale=0.3, dropout=0.0
    )
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="k and v both float32 or both float16"):
        torch.ops.fusionlm.decode_attention(q, k, v.float(), mask, 0.3)


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
    actual = sdpa_cpu_attention(q, k, v, mask=mask, is_causal=False, scale=0.3, dropout=0.0)
    torch.testing.assert_close(actual, clean, atol=1e-6, rtol=1e-5)


def test_single_query_with_autograd_takes_the_differentiable_path():
    q, k, v = single_query_inputs(2)
    q.requires_grad_()
    sdpa_cpu_attention(q, k, v, mask=None, is_causal=False, scale=0.3, dropout=0.0).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_decode_attention_kernel_refuses_a_mask_that_does_not_fit():
    assert load_kernels()
    q, k, v = single_query_inputs(2)
    with pytest.raises(RuntimeError, match=r"mask must be bool \[1 or b, 1 or h, 1 or s_q, s\]"):
        torch.ops.fusionlm.decode_attention(q, k, v, torch.ones(3, 1, 1, 9, dtype=torch.bool), 0.3)
    with pytest.raises(RuntimeError, match="do not fit q"):
        torch.ops.fusionlm.decode_attention(q, k[:, :, :, :4], v[:, :, :, :4], None, 0.3)
