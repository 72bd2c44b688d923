"""Static key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError


class KVCache(nn.Module):
    """Preallocated key and value buffers ``[b, n_kv_heads, max_seq_len, head_dim]``.

    Slots are filled left to right: the ``s`` tokens of a call occupy slots
    ``[size, size + s)``, where ``size`` counts the tokens written so far. A slot is the
    token's column in the (left-padded) batch, shared by all rows; the token's *position*,
    which may differ per row, only enters through RoPE before the write. Keeping the two
    apart is what lets a left-padded batch decode in one cache: with slots at positions,
    every row's padding would collide with its first real token.

    Two ways to read it back. By default ``update`` returns only the filled prefix, so
    attention never reads unwritten slots and its cost grows with what was written. With
    ``fixed_shape=True`` it returns the whole buffer, so every decode step has the same
    shapes and ``torch.compile`` builds one graph for all of them; the write positions are
    then a tensor (``next_slot [b]``, one per row), not a Python int a compiled graph would
    specialise on, and attention masks the unwritten slots with ``filled_mask`` (an
    exactly-zero weight; the ``sdpa`` backend's decode kernel skips masked slots without
    reading them). Rows then fill independently: a server's rows hold different requests,
    each at its own length (``row``, ``set_lengths`` and ``copy_row`` manage them).

    Args:
        batch_size: rows in the batch.
        max_seq_len: slots per row.
        num_kv_heads: key/value heads.
        head_dim: channels per head.
        dtype: buffer dtype.
        fixed_shape: return the whole buffer from ``update`` (see above).
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
        fixed_shape: bool = False,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.fixed_shape = fixed_shape
        self.register_buffer(
            "next_slot", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False
        )
        self._size = 0

    @property
    def size(self) -> int:
        """Slots written so far; in ``fixed_shape`` mode, in the fullest row (a host sync)."""
        return int(self.next_slot.max()) if self.fixed_shape else self._size

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
        self.next_slot.zero_()
        self._size = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``/``v`` ``[b, n_kv_heads, s, head_dim]`` and return what attention reads.

        Returns:
            keys and values ``[b, n_kv_heads, size + s, head_dim]`` (views of the buffers);
            with ``fixed_shape``, the whole buffers ``[b, n_kv_heads, max_seq_len, head_dim]``.

        Raises:
            ValueError: if the batch size differs from the cache's, or the cache would overflow
                (in ``fixed_shape`` mode the caller checks the length up front: checking here
                would cost a host sync per layer, and an out-of-range write still raises).
        """
        b, _, s, _ = k.shape
        if b != self.batch_size:
            raise InvalidInputError(
                f"KV cache was set up for batch size {self.batch_size} but got {b}; "
                "call setup_caches with the batch size you run."
            )
        if self.fixed_shape:
            slots = self.next_slot[:, None] + torch.arange(s, device=k.device)  # [b, s]
            rows = torch.arange(b, device=k.device)[:, None]
            # Indexing writes in place, also in a compiled step (a scatter would be
            # functionalized into a copy of the whole cache per layer and step).
            self.k_cache[rows, :, slots] = k.transpose(1, 2).to(self.k_cache.dtype)
            self.v_cache[rows, :, slots] = v.transpose(1, 2).to(self.v_cache.dtype)
            self.next_slot.add_(s)
            return self.k_cache, self.v_cache
        end = self._size + s
        if end > self.max_seq_len:
            raise InvalidInputError(
                f"KV cache overflow: {self._size} tokens cached + {s} new > {self.max_seq_len} "
                "slots; call reset_caches() or setup_caches with a larger decoder_max_seq_len."
            )
        self.k_cache[:, :, self._size : end] = k
        self.v_cache[:, :, self._size : end] = v
        self._size = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def filled(self) -> tuple[Tensor, Tensor]:
        """Keys and values written so far, ``[b, n_kv_heads, size, head_dim]`` (views)."""
        size = self.size
        return self.k_cache[:, :, :size], self.v_cache[:, :, :size]

    def filled_mask(self, q_len: int, *, causal: bool, pending: int = 0) -> Tensor:
        """Which slots the last ``q_len`` tokens written may read, for ``fixed_shape`` mode;
        ``pending``: that many of them are yet to be written (a mask made before the write).

        Returns:
            bool ``[b, 1, q_len, max_seq_len]``: the slots each row has written; with
            ``causal``, only up to each query's own slot.
        """
        slots = torch.arange(self.max_seq_len, device=self.next_slot.device)
        written = self.next_slot + pending  # [b]
        if causal:
            offsets = torch.arange(q_len, device=slots.device)
            last = written[:, None] - q_len + offsets  # [b, q_len]
            visible = slots <= last[..., None]
        else:
            visible = (slots < written[:, None, None]).expand(-1, q_len, -1)
        return visible[:, None]

    def row(self, index: int) -> KVCache:
        """Row ``index`` as a cache of batch size 1 sharing this cache's memory: what a
        batch-1 forward writes into it lands in that row (a request's prompt, run alone).
        ``fixed_shape`` mode only: its write position is the row's own."""
        self._require_fixed_shape("row")
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        for name in ("k_cache", "v_cache", "next_slot"):
            view.register_buffer(name, getattr(self, name)[index : index + 1], persistent=False)
        view.fixed_shape = True
        view._size = 0
        return view

    def set_lengths(self, lengths: Tensor) -> None:
        """Each row keeps the first ``lengths [b]`` slots; its next write goes to the slot
        after them (``fixed_shape`` mode). What a row held beyond stays until overwritten."""
        self._require_fixed_shape("set_lengths")
        if (
            lengths.shape != self.next_slot.shape
            or int(lengths.min()) < 0
            or int(lengths.max()) > self.max_seq_len
        ):
            raise InvalidInputError(
                f"lengths must be [{self.batch_size}] values in [0, {self.max_seq_len}], got "
                f"{lengths.tolist()}"
            )
        self.next_slot.copy_(lengths)

    def copy_row(self, source: int, target: int) -> None:
        """Make row ``target`` hold what row ``source`` holds (``fixed_shape`` mode)."""
        self._require_fixed_shape("copy_row")
        length = int(self.next_slot[source])
        self.k_cache[target, :, :length] = self.k_cache[source, :, :length]
        self.v_cache[target, :, :length] = self.v_cache[source, :, :length]
        self.next_slot[target] = length

    def _require_fixed_shape(self, what: str) -> None:
        if not self.fixed_shape:
            raise RuntimeError(
                f"KVCache.{what} needs per-row write positions: set up the caches with "
                "fixed_shape=True"
            )

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.k_cache.shape)}, dtype={self.k_cache.dtype}, size={self.size}, "
            f"fixed_shape={self.fixed_shape}"
        )
