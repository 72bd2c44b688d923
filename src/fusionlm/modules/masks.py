"""Attention masks as composable predicates.

A *mask predicate* answers "may query ``q_idx`` of row ``b`` (head ``h``) attend to key
``kv_idx``?" with a signature identical to flex attention's ``mask_mod``::

    predicate(b, h, q_idx, kv_idx) -> bool tensor

Predicates use only tensor ops and indexing, so the same predicate can be evaluated on
broadcast index grids (a dense bool mask for eager/SDPA) or handed to
``create_block_mask`` (a sparse ``BlockMask`` for flex attention). Indices are absolute:
``kv_idx`` is the key's slot and ``q_idx`` the query's slot in the same sequence, so a
chunk of queries after ``q_offset`` cached tokens is masked by passing ``q_offset``.

The library has one mask representation: a bool tensor ``[b, 1 or h, q, kv]`` where
True means "may attend", or a flex ``BlockMask``. ``as_bool_mask`` and ``as_block_mask``
convert between them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import torch
from torch import Tensor

from fusionlm.errors import InvalidInputError

if TYPE_CHECKING:
    # Imported where a BlockMask is made: flex attention's module imports torch's compiler
    # stack (about 1 s), which dense masks never need.
    from torch.nn.attention.flex_attention import BlockMask

MaskPredicate = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
AttentionMask: TypeAlias = "Tensor | BlockMask"


def causal() -> MaskPredicate:
    """A query attends to itself and every earlier slot."""

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return kv_idx <= q_idx

    return predicate


def sliding_window(window: int) -> MaskPredicate:
    """A query attends only to the ``window`` most recent slots, itself included.

    Combine with ``causal()`` for the usual local causal attention.
    """
    if window < 1:
        raise InvalidInputError(f"sliding window must be >= 1, got {window}")

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx - kv_idx < window

    return predicate


def padding(keep: Tensor) -> MaskPredicate:
    """Keys whose ``keep[b, kv_idx]`` is False (padding) are never attended.

    Args:
        keep: bool ``[b, kv_len]``, True for real tokens.
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise InvalidInputError(
            f"padding keep-mask must be a bool [b, kv_len] tensor, got {keep.dtype} {tuple(keep.shape)}"
        )

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep[b, kv_idx]

    return predicate


def document(document_ids: Tensor) -> MaskPredicate:
    """Queries attend only within their own document of a packed row.

    Args:
        document_ids: integer ``[b, s]``, the document each slot belongs to.
    """
    if document_ids.dim() != 2 or document_ids.is_floating_point():
        raise InvalidInputError(
            f"document ids must be an integer [b, s] tensor, got {document_ids.dtype} {tuple(document_ids.shape)}"
        )

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return predicate


def and_masks(*predicates: MaskPredicate) -> MaskPredicate:
    """True where every predicate is True."""
    if not predicates:
        raise InvalidInputError("and_masks needs at least one predicate")

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = predicates[0](b, h, q_idx, kv_idx)
        for other in predicates[1:]:
            result = result & other(b, h, q_idx, kv_idx)
        return result

    return predicate


def or_masks(*predicates: MaskPredicate) -> MaskPredicate:
    """True where any predicate is True."""
    if not predicates:
        raise InvalidInputError("or_masks needs at least one predicate")

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        result = predicates[0](b, h, q_idx, kv_idx)
        for other in predicates[1:]:
            result = result | other(b, h, q_idx, kv_idx)
        return result

    return predicate


def _offset(predicate: MaskPredicate, q_offset: int) -> MaskPredicate:
    if q_offset == 0:
        return predicate
    return lambda b, h, q_idx, kv_idx: predicate(b, h, q_idx + q_offset, kv_idx)


def to_bool_mask(
    predicate: MaskPredicate,
    *,
    batch_size: int,
    q_len: int,
    kv_len: int,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Evaluate ``predicate`` densely.

    Returns:
        bool ``[batch_size, 1, q_len, kv_len]``; query ``i`` is slot ``q_offset + i``.
    """
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return predicate(b, h, q_idx, kv_idx).expand(batch_size, 1, q_len, kv_len)


def to_block_mask(
    predicate: MaskPredicate,
    *,
    batch_size: int | None,
    q_len: int,
    kv_len: int,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> BlockMask:
    """Turn ``predicate`` into a flex ``BlockMask`` of shape ``(batch_size, 1, q_len, kv_len)``.

    ``batch_size=None`` makes a mask that broadcasts over the batch (the predicate must not
    depend on ``b``).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = device if device is not None else "cpu"
    return create_block_mask(
        _offset(predicate, q_offset), batch_size, None, q_len, kv_len, device=device
    )


def as_bool_mask(mask: AttentionMask) -> Tensor:
    """A dense bool mask ``[b, 1 or h, q, kv]`` from either representation."""
    if isinstance(mask, Tensor):
        return mask
    batch_size, heads, q_len, kv_len = mask.shape
    b = torch.arange(batch_size, device=mask.kv_num_blocks.device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=b.device).view(1, -1, 1, 1)
    q_idx = torch.arange(q_len, device=b.device).view(1, 1, -1, 1)
    kv_idx = torch.arange(kv_len, device=b.device).view(1, 1, 1, -1)
    return mask.mask_mod(b, h, q_idx, kv_idx).expand(batch_size, heads, q_len, kv_len)


def as_block_mask(mask: AttentionMask) -> BlockMask:
    """A flex ``BlockMask`` from either representation; size-1 batch or head dims broadcast."""
    if not isinstance(mask, Tensor):
        return mask
    from torch.nn.attention.flex_attention import create_block_mask

    batch_size, heads, q_len, kv_len = mask.shape
    dense = mask

    def predicate(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[b if batch_size > 1 else 0, h if heads > 1 else 0, q_idx, kv_idx]

    return create_block_mask(
        predicate,
        batch_size if batch_size > 1 else None,
        heads if heads > 1 else None,
        q_len,
        kv_len,
        device=mask.device,
    )


__all__ = [
    "AttentionMask",
    "MaskPredicate",
    "and_masks",
    "as_block_mask",
    "as_bool_mask",
    "causal",
    "document",
    "or_masks",
    "padding",
    "sliding_window",
    "to_block_mask",
    "to_bool_mask",
]
