"""Mask predicates, their composition, and the two representations."""

from __future__ import annotations

import pytest
import torch

from fusionlm.modules import masks
from fusionlm.modules.attention import ATTENTION_BACKENDS


def test_causal_and_sliding_window():
    predicate = masks.and_masks(masks.causal(), masks.sliding_window(3))
    dense = masks.to_bool_mask(predicate, batch_size=1, q_len=5, kv_len=5)[0, 0]
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(dense, (j <= i) & (i - j < 3))


def test_q_offset_shifts_queries_for_cached_decoding():
    dense = masks.to_bool_mask(masks.causal(), batch_size=1, q_len=2, kv_len=6, q_offset=4)[0, 0]
    assert torch.equal(
        dense, torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    )


def test_padding_and_document_and_or():
    keep = torch.tensor([[False, True, True, True]])
    docs = torch.tensor([[0, 0, 1, 1]])
    both = masks.and_masks(masks.padding(keep), masks.document(docs))
    dense = masks.to_bool_mask(both, batch_size=1, q_len=4, kv_len=4)[0, 0]
    expected = torch.tensor(
        [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(dense, expected)
    either = masks.or_masks(masks.padding(keep), masks.document(docs))
    assert masks.to_bool_mask(either, batch_size=1, q_len=4, kv_len=4)[0, 0, 0].tolist() == [
        True,
        True,
        True,
        True,
    ]


def test_block_mask_and_bool_mask_agree():
    keep = torch.rand(2, 130) > 0.2
    docs = torch.randint(0, 3, (2, 130)).sort(dim=-1).values
    predicate = masks.and_masks(masks.causal(), masks.padding(keep), masks.document(docs))
    dense = masks.to_bool_mask(predicate, batch_size=2, q_len=130, kv_len=130)
    block = masks.to_block_mask(predicate, batch_size=2, q_len=130, kv_len=130)
    assert torch.equal(masks.as_bool_mask(block), dense)
    assert torch.equal(masks.as_bool_mask(masks.as_block_mask(dense)), dense)


@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
def test_a_query_that_sees_nothing_gets_zeros_not_nan(backend):
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, 0, 3] = False
    out = ATTENTION_BACKENDS[backend](
        q, k, v, mask=mask, is_causal=False, scale=8**-0.5, dropout=0.0
    )
    assert not out.isnan().any()
    assert torch.equal(out[1, :, 3], torch.zeros(4, 8))
    assert out[0, :, 3].abs().sum() > 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: masks.sliding_window(0), "sliding window"),
        (lambda: masks.padding(torch.ones(2, 3)), "bool"),
        (lambda: masks.document(torch.zeros(3)), "integer"),
        (lambda: masks.and_masks(), "at least one"),
    ],
)
def test_bad_mask_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
