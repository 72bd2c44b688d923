"""Static key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Preallocated key and value buffers ``[b, n_kv_heads, max_seq_len, head_dim]``.

    Slots are filled left to right: the ``s`` tokens of a call occupy slots
    ``[size, size + s)``, where ``size`` counts the tokens written so far. A slot is the
    token's column in the (left-padded) batch, shared by all rows; the token's *position*,
    which may differ per row, only enters through RoPE before the write. Keeping the two
    apart is what lets a left-padded batch decode in one cache: with slots at positions,
    every row's padding would collide with its first real token.

    ``update`` returns only the filled prefix, so attention never reads unwritten slots.

    Args:
        batch_size: rows in the batch.
        max_seq_len: slots per row.
        num_kv_heads: key/value heads.
        head_dim: channels per head.
        dtype: buffer dtype.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.size = 0

    @property
    def batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        """Zero the buffers and mark every slot free, keeping the allocation."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.size = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``/``v`` ``[b, n_kv_heads, s, head_dim]`` and return the filled prefix.

        Returns:
            keys and values ``[b, n_kv_heads, size + s, head_dim]`` (views of the buffers).

        Raises:
            ValueError: if the batch size differs from the cache's, or the cache would overflow.
        """
        b, _, s, _ = k.shape
        if b != self.batch_size:
            raise ValueError(
                f"KV cache was set up for batch size {self.batch_size} but got {b}; "
                "call setup_caches with the batch size you run."
            )
        end = self.size + s
        if end > self.max_seq_len:
            raise ValueError(
                f"KV cache overflow: {self.size} tokens cached + {s} new > {self.max_seq_len} slots; "
                "call reset_caches() or setup_caches with a larger decoder_max_seq_len."
            )
        self.k_cache[:, :, self.size : end] = k
        self.v_cache[:, :, self.size : end] = v
        self.size = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def filled(self) -> tuple[Tensor, Tensor]:
        """Keys and values written so far, ``[b, n_kv_heads, size, head_dim]`` (views)."""
        return self.k_cache[:, :, : self.size], self.v_cache[:, :, : self.size]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k_cache.shape)}, dtype={self.k_cache.dtype}, size={self.size}"
