"""Multi-head attention (MHA, GQA, MQA; self and cross) and the attention backend registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.kv_cache import KVCache
from fusionlm.modules.masks import (
    AttentionMask,
    as_block_mask,
    as_bool_mask,
    causal,
    to_block_mask,
    to_bool_mask,
)
from fusionlm.modules.pytorch_utils import find_pruneable_heads_and_indices, prune_linear_layer


class AttentionBackend(Protocol):
    """What every backend computes: ``softmax(q kᵀ · scale + mask) v``.

    Args:
        q: ``[b, h, s_q, d]``.
        k, v: ``[b, h_kv, s_kv, d]`` with ``h % h_kv == 0`` (grouped-query attention).
        mask: a bool mask ``[b, 1 or h, s_q, s_kv]`` (True = may attend) or a ``BlockMask``;
            None means every key, or causal when ``is_causal`` (only with ``s_q == s_kv``).
        is_causal: apply a causal mask when ``mask`` is None.
        scale: the factor on the scores.
        dropout: attention-probability dropout (0 at inference).

    Returns:
        ``[b, h, s_q, d]``. A query that may attend to no key gets zeros, never NaN.
    """

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: AttentionMask | None,
        is_causal: bool,
        scale: float,
        dropout: float,
    ) -> Tensor: ...


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {}


def register_attention_backend(name: str) -> Callable[[AttentionBackend], AttentionBackend]:
    """Decorator adding a backend under ``name``; see ``AttentionBackend`` for the contract."""

    def register(fn: AttentionBackend) -> AttentionBackend:
        if name in ATTENTION_BACKENDS:
            raise InvalidInputError(f"attention backend {name!r} is already registered")
        ATTENTION_BACKENDS[name] = fn
        return fn

    return register


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown attention backend {name!r}; known: {sorted(ATTENTION_BACKENDS)}"
        ) from None


def _in_query_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values in the queries' dtype: a cache may store them narrower (fp16)."""
    return k.to(q.dtype), v.to(q.dtype)


@register_attention_backend("eager")
def eager_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | None,
    is_causal: bool,
    scale: float,
    dropout: float,
) -> Tensor:
    """Matmul, fp32 softmax, matmul: the reference every backend is tested against.

    Query heads are grouped onto their key/value head by a view, never by copying keys.
    """
    k, v = _in_query_dtype(q, k, v)
    b, h, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    q = q.view(b, h_kv, h // h_kv, s_q, d)
    scores = (q @ k.unsqueeze(2).transpose(-2, -1)) * scale  # [b, h_kv, g, s_q, s_kv]
    if mask is None and is_causal:
        mask = to_bool_mask(causal(), batch_size=1, q_len=s_q, kv_len=s_kv, device=q.device)
    if mask is not None:
        mask = as_bool_mask(mask)
        mask = mask.view(mask.shape[0], -1, h // h_kv if mask.shape[1] > 1 else 1, s_q, s_kv)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if mask is not None:
        # An all-masked row softmaxes to NaN; such a query attends to nothing and outputs zeros.
        probs = torch.where(mask.any(dim=-1, keepdim=True), probs, 0.0)
    probs = F.dropout(probs.to(q.dtype), p=dropout)
    return (probs @ v.unsqueeze(2)).view(b, h, s_q, d)


@register_attention_backend("sdpa")
def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | None,
    is_causal: bool,
    scale: float,
    dropout: float,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where available).

    A single query (a decode step) takes the grouped matmuls of ``eager_attention``: on CPU
    the fused kernel costs ~3 ms per call there, more than the whole layer's weights.
    (``fusionlm.inference.attention`` registers ``sdpa_cpu``, which has a kernel for it.)
    """
    if q.shape[2] == 1 and dropout == 0.0:
        return eager_attention(q, k, v, mask=mask, is_causal=False, scale=scale, dropout=0.0)
    k, v = _in_query_dtype(q, k, v)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if mask is None else as_bool_mask(mask),
        is_causal=is_causal and mask is None,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


@register_attention_backend("flex")
def flex_attention_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: AttentionMask | None,
    is_causal: bool,
    scale: float,
    dropout: float,
) -> Tensor:
    """``torch.nn.attention.flex_attention`` with a ``BlockMask``; block-sparse, compiles well."""
    from torch.nn.attention.flex_attention import flex_attention

    if dropout > 0.0:
        raise InvalidInputError(
            "the flex attention backend does not support attention dropout; use 'sdpa'"
        )
    if mask is None and is_causal:
        mask = to_block_mask(
            causal(), batch_size=None, q_len=q.shape[2], kv_len=k.shape[2], device=q.device
        )
    block_mask = None if mask is None else as_block_mask(mask)
    k, v = _in_query_dtype(q, k, v)
    return flex_attention(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class MultiHeadAttention(nn.Module):
    """Attention with separate query and key/value head counts (MHA, GQA, MQA).

    Self-attention when ``forward`` gets only ``x``; cross-attention when it also gets
    ``y`` (keys and values from ``y``, no positional embedding). ``head_dim`` is independent
    of ``embed_dim``.

    Args:
        embed_dim: model width ``d``.
        num_heads: query heads ``h``.
        num_kv_heads: key/value heads ``h_kv``; ``h % h_kv == 0``.
        head_dim: channels per head.
        q_proj: ``[d] -> [h * head_dim]``.
        k_proj, v_proj: ``[d_y] -> [h_kv * head_dim]``.
        output_proj: ``[h * head_dim] -> [d]``.
        pos_embeddings: applied to queries and keys, ``f(x [b, s, n, head_dim], input_pos=[b, s])``.
        q_norm, k_norm: per-head norms on ``head_dim``, applied before ``pos_embeddings``.
        max_seq_len: the longest sequence this layer accepts (and the default cache length).
        is_causal: self-attention masks the future when no mask is given.
        attn_dropout: dropout on attention probabilities while training.
        backend: a name in ``ATTENTION_BACKENDS``.
        scale: the score factor; ``head_dim ** -0.5`` by default.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        max_seq_len: int = 4096,
        is_causal: bool = True,
        attn_dropout: float = 0.0,
        backend: str = "sdpa",
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise InvalidInputError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        if not 0.0 <= attn_dropout <= 1.0:
            raise InvalidInputError(f"attn_dropout must be in [0, 1], got {attn_dropout}")
        get_attention_backend(backend)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.is_causal = is_causal
        self.attn_dropout = attn_dropout
        self.backend = backend
        self.scale = scale if scale is not None else head_dim**-0.5
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.kv_cache: KVCache | None = None
        self.cache_enabled = False
        # True while the caller's masks already leave out a fixed-shape cache's unfilled
        # slots (``masks_cover_filled_slots``), so each layer need not mask them again.
        self.masks_filled_slots = False
        # After head pruning, query head i reads key/value head kv_head_of_query[i]; None while
        # the heads form equal consecutive groups, which every backend handles natively.
        self.register_buffer("kv_head_of_query", None, persistent=False)
        self.pruned_heads: set[int] = set()
        self._original_group_size = num_heads // num_kv_heads

    # -- cache -----------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Allocate a ``KVCache`` for ``batch_size`` rows of ``max_seq_len`` slots and enable it
        (``fixed_shape``: see ``KVCache``)."""
        self.kv_cache = KVCache(
            batch_size=batch_size,
            max_seq_len=max_seq_len if max_seq_len is not None else self.max_seq_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            device=self.q_proj.weight.device,
            fixed_shape=fixed_shape,
        )
        self.cache_enabled = True

    def remove_cache(self) -> None:
        """Free the cache; the layer runs without one again."""
        self.kv_cache = None
        self.cache_enabled = False

    def reset_cache(self) -> None:
        """Empty the cache. Raises RuntimeError if none was set up."""
        if self.kv_cache is None:
            raise RuntimeError("KV cache is not set up; call setup_caches() first")
        self.kv_cache.reset()

    # -- forward ---------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        mask: AttentionMask | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``x`` to ``y``.

        Args:
            x: the queries' input ``[b, s, d]``.
            y: the keys' and values' input ``[b, s_y, d_y]``: ``x`` itself for self-attention,
                the encoder output for cross-attention. None reads keys and values from the
                cache alone (cross-attention while decoding).
            mask: bool ``[b, s, s_kv]`` or ``[b, 1 or h, s, s_kv]`` (True = may attend), or a
                ``BlockMask``. With a cache, ``s_kv`` may be the cache length: the unfilled
                tail is ignored. None: causal for causal self-attention, else every key.
            input_pos: positions ``[b, s]`` for ``pos_embeddings``.

        Returns:
            ``[b, s, d]``.

        Raises:
            ValueError: ``y`` is None without a filled cache; ``input_pos`` missing with
                positional embeddings; a mask that does not fit.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.pos_embeddings is not None:
            if input_pos is None:
                raise InvalidInputError("input_pos [b, s] is required with positional embeddings")
            q = self.pos_embeddings(q, input_pos=input_pos)
        q = q.transpose(1, 2)

        if y is None:
            if self.kv_cache is None or not self.cache_enabled or self.kv_cache.size == 0:
                raise InvalidInputError(
                    "attention needs y, or a filled and enabled KV cache to read from"
                )
            k, v = self.kv_cache.filled()
        else:
            k, v = self._project_kv(y, input_pos=input_pos)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
                if self.kv_cache.fixed_shape and s > 1 and not torch.compiler.is_compiling():
                    # A prompt, run eagerly: attend over the filled slots alone, with the
                    # causal kernel instead of a mask over the whole cache (~10% faster).
                    k, v = self.kv_cache.filled()
                elif self.kv_cache.fixed_shape and not (
                    self.masks_filled_slots and isinstance(mask, Tensor)
                ):
                    mask = self._only_filled_slots(mask, b=b, q_len=s)
        if self.kv_head_of_query is not None:
            k = k.index_select(1, self.kv_head_of_query)
            v = v.index_select(1, self.kv_head_of_query)

        mask, is_causal = self._resolve_mask(mask, b=b, q_len=s, kv_len=k.shape[2])
        out = get_attention_backend(self.backend)(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            scale=self.scale,
            dropout=self.attn_dropout if self.training else 0.0,
        )
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _project_kv(self, y: Tensor, *, input_pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """Keys and values ``[b, h_kv, s_y, head_dim]`` from ``y`` ``[b, s_y, d_y]``."""
        b, s_y, _ = y.shape
        k = self.k_proj(y).view(b, s_y, -1, self.head_dim)
        v = self.v_proj(y).view(b, s_y, -1, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.pos_embeddings is not None:
            k = self.pos_embeddings(k, input_pos=input_pos)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _only_filled_slots(self, mask: AttentionMask | None, *, b: int, q_len: int) -> Tensor:
        """``mask`` (None: causal for causal attention) and the slots a fixed-shape cache has
        filled, as one bool ``[b or 1, 1 or h, q_len, cache length]``."""
        filled = self.kv_cache.filled_mask(q_len, causal=self.is_causal)
        if mask is None:
            return filled
        if not isinstance(mask, Tensor):
            raise InvalidInputError(
                "a fixed-shape KV cache needs a bool mask (or None), not a BlockMask; set up "
                "the caches without fixed_shape to decode with flex block masks"
            )
        mask, _ = self._resolve_mask(mask, b=b, q_len=q_len, kv_len=filled.shape[-1])
        return mask & filled

    def _resolve_mask(
        self, mask: AttentionMask | None, *, b: int, q_len: int, kv_len: int
    ) -> tuple[AttentionMask | None, bool]:
        """Bring ``mask`` to ``[b, 1 or h, q_len, kv_len]``, or pick the implicit causal mask."""
        if mask is None:
            if not self.is_causal or q_len == 1:
                return None, False
            if q_len == kv_len:
                return None, True
            # A chunk of queries after cached tokens: causal, shifted by what the cache held.
            return to_bool_mask(
                causal(),
                batch_size=1,
                q_len=q_len,
                kv_len=kv_len,
                q_offset=kv_len - q_len,
                device=self.q_proj.weight.device,
            ), False
        if not isinstance(mask, Tensor):
            return mask, False
        if mask.dtype != torch.bool:
            raise InvalidInputError(
                f"attention mask must be bool (True = may attend), got {mask.dtype}"
            )
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        if (
            mask.dim() != 4
            or mask.shape[2] != q_len
            or mask.shape[3] < kv_len
            or mask.shape[0] not in (1, b)
        ):
            raise InvalidInputError(
                f"attention mask of shape {tuple(mask.shape)} does not fit {b} rows of {q_len} "
                f"queries over {kv_len} keys; expected [b, {q_len}, >= {kv_len}]"
            )
        return mask[..., :kv_len], False

    # -- pruning ---------------------------------------------------------------------------

    def prune_heads(self, heads: Iterable[int]) -> None:
        """Remove query heads (numbered as in the unpruned layer), correct for GQA.

        Query rows of ``q_proj`` and the matching input columns of ``output_proj`` are cut. A
        key/value head whose whole group is pruned is cut from ``k_proj``/``v_proj`` too. When the
        survivors no longer form equal groups, queries read their key/value head by index.
        Must be called before ``setup_cache``.
        """
        if self.kv_cache is not None:
            raise RuntimeError("prune heads before setting up the KV cache")
        heads = set(heads)
        original_heads = self.num_heads + len(self.pruned_heads)
        if not heads <= set(range(original_heads)):
            raise InvalidInputError(
                f"head indices {sorted(heads)} out of range [0, {original_heads})"
            )
        heads, q_index = find_pruneable_heads_and_indices(
            heads, self.num_heads, self.head_dim, self.pruned_heads
        )
        if not heads:
            return
        if len(heads) + len(self.pruned_heads) == original_heads:
            raise InvalidInputError("cannot prune every head of an attention layer")
        kv_of_query = {
            q: q // self._original_group_size
            for q in range(original_heads)
            if q not in self.pruned_heads
        }
        kept_queries = [q for q in range(original_heads) if q not in heads | self.pruned_heads]
        kept_kv = sorted({kv_of_query[q] for q in kept_queries})
        current_kv = sorted(set(kv_of_query.values()))
        if kept_kv != current_kv:
            kv_rows = torch.cat(
                [
                    torch.arange(self.head_dim) + current_kv.index(kv) * self.head_dim
                    for kv in kept_kv
                ]
            )
            self.k_proj = prune_linear_layer(self.k_proj, kv_rows.to(self.k_proj.weight.device))
            self.v_proj = prune_linear_layer(self.v_proj, kv_rows.to(self.v_proj.weight.device))
        self.q_proj = prune_linear_layer(self.q_proj, q_index.to(self.q_proj.weight.device))
        self.output_proj = prune_linear_layer(
            self.output_proj, q_index.to(self.output_proj.weight.device), dim=1
        )
        self.pruned_heads |= heads
        self.num_heads = len(kept_queries)
        self.num_kv_heads = len(kept_kv)
        mapping = [kept_kv.index(kv_of_query[q]) for q in kept_queries]
        groups = self.num_heads // self.num_kv_heads
        uniform = self.num_heads % self.num_kv_heads == 0 and mapping == [
            i // groups for i in range(self.num_heads)
        ]
        self.kv_head_of_query = (
            None if uniform else torch.tensor(mapping, device=self.q_proj.weight.device)
        )
