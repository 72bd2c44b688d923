"""Transformer layers: pre-norm self-attention, gated cross-attention, and activation checkpointing.

Every layer has the same call signature, so a decoder can hold any mix of them::

    layer(x, *, mask=None, encoder_input=None, encoder_mask=None, input_pos=None) -> x

A layer ignores the arguments that are not its business (a self-attention layer never
reads the encoder input; a cross-attention layer never reads the causal mask).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusionlm.errors import InvalidInputError
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.masks import AttentionMask


class GradientCheckpointingLayer(nn.Module):
    """A module whose forward can be recomputed in backward instead of storing activations.

    As transformers' ``GradientCheckpointingLayer``: off by default; when
    ``gradient_checkpointing`` is True and the module is training with grad enabled, the call
    runs under ``torch.utils.checkpoint``. Non-reentrant by default, which handles keyword
    arguments (gradients flow into tensors passed by keyword). The reentrant variant only
    propagates gradients through positional tensors, so passing a keyword tensor that
    requires grad raises instead of silently dropping its gradient.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.checkpoint_use_reentrant = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # nn.Module.__call__ by name, not super(): dynamo would guard the layer's class
        # __mro__, which keeps it from checking a compiled step's layers by dict tags.
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return nn.Module.__call__(self, *args, **kwargs)
        if self.checkpoint_use_reentrant:
            grad_kwargs = [
                k for k, v in kwargs.items() if isinstance(v, Tensor) and v.requires_grad
            ]
            if grad_kwargs:
                raise InvalidInputError(
                    f"reentrant checkpointing drops gradients of keyword tensors {grad_kwargs}; "
                    "pass them positionally or use use_reentrant=False"
                )
        return checkpoint(
            functools.partial(nn.Module.__call__, self, **kwargs),
            *args,
            use_reentrant=self.checkpoint_use_reentrant,
        )


class _CachedLayerMixin:
    """Cache bookkeeping shared by layers that own one attention module, ``self.attn``."""

    attn: MultiHeadAttention

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None and self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()


class TransformerSelfAttentionLayer(_CachedLayerMixin, GradientCheckpointingLayer):
    """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``.

    Args:
        attn: self-attention.
        mlp: feed-forward block.
        sa_norm: norm before attention (identity if None).
        mlp_norm: norm before the MLP (identity if None).
        sa_scale, mlp_scale: applied to each branch before the residual add (identity if None).
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        sa_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        sa_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.sa_norm = sa_norm if sa_norm is not None else nn.Identity()
        self.mlp_norm = mlp_norm if mlp_norm is not None else nn.Identity()
        self.sa_scale = sa_scale if sa_scale is not None else nn.Identity()
        self.mlp_scale = mlp_scale if mlp_scale is not None else nn.Identity()

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Allocate this layer's self-attention cache of ``decoder_max_seq_len`` slots
        (``fixed_shape``: see ``KVCache``)."""
        self.attn.setup_cache(
            batch_size, dtype, max_seq_len=decoder_max_seq_len, fixed_shape=fixed_shape
        )

    def forward(
        self,
        x: Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``[b, s, d] -> [b, s, d]``; ``encoder_input``/``encoder_mask`` are ignored."""
        normed = self.sa_norm(x)
        h = x + self.sa_scale(self.attn(normed, normed, mask=mask, input_pos=input_pos))
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))


class TanhGate(nn.Module):
    """``x * tanh(scale)``, a learnable gate; starting at 0 it passes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.tanh()


class TransformerCrossAttentionLayer(_CachedLayerMixin, GradientCheckpointingLayer):
    """Pre-norm cross-attention layer: text queries attend to encoder keys and values.

    ``x + ca_scale(attn(norm(x), encoder_input))``, then ``h + mlp_scale(mlp(norm(h)))``.
    With ``TanhGate`` scales at zero the layer is the identity, so a fresh fusion layer leaves
    a pretrained decoder's output unchanged. Keys and values are computed once, when an
    ``encoder_input`` arrives, and read from the cache for the following decode steps.

    A text row whose ``encoder_mask`` row is all False (e.g. text before the first image) is
    handled by ``empty_rows``:

    - ``"skip"``: the row gets no update at all; attention and MLP outputs are zero, never NaN.
    - ``"attend_all"``: the row attends to every encoder position and only its MLP update is
      dropped. Some published implementations compute this, and checkpoints converted from
      them need it to reproduce their outputs.

    Args:
        attn: cross-attention (``is_causal=False``, no positional embedding).
        mlp: feed-forward block.
        ca_norm, mlp_norm: norms before attention and MLP (identity if None).
        ca_scale, mlp_scale: per-branch scales, e.g. ``TanhGate`` (identity if None).
        empty_rows: ``"skip"`` or ``"attend_all"``, see above.
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        ca_norm: nn.Module | None = None,
        mlp_norm: nn.Module | None = None,
        ca_scale: nn.Module | None = None,
        mlp_scale: nn.Module | None = None,
        empty_rows: Literal["skip", "attend_all"] = "skip",
    ) -> None:
        super().__init__()
        if attn.pos_embeddings is not None or attn.is_causal:
            raise InvalidInputError(
                "cross-attention must be built with is_causal=False and no pos_embeddings"
            )
        if empty_rows not in ("skip", "attend_all"):
            raise InvalidInputError(
                f"empty_rows must be 'skip' or 'attend_all', got {empty_rows!r}"
            )
        self.attn = attn
        self.mlp = mlp
        self.ca_norm = ca_norm if ca_norm is not None else nn.Identity()
        self.mlp_norm = mlp_norm if mlp_norm is not None else nn.Identity()
        self.ca_scale = ca_scale if ca_scale is not None else nn.Identity()
        self.mlp_scale = mlp_scale if mlp_scale is not None else nn.Identity()
        self.empty_rows = empty_rows

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Allocate the encoder key/value cache of ``encoder_max_seq_len`` slots.

        ``fixed_shape`` changes nothing here: the encoder's keys and values are written once,
        filling the cache, so reading it back already has a fixed shape.
        """
        if encoder_max_seq_len is None:
            raise InvalidInputError(
                "a cross-attention layer needs encoder_max_seq_len to set up its cache"
            )
        self.attn.setup_cache(batch_size, dtype, max_seq_len=encoder_max_seq_len)

    def forward(
        self,
        x: Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``[b, s, d] -> [b, s, d]``.

        Args:
            encoder_input: ``[b, s_e, d_e]``; None while decoding from the cache, or when
                there is nothing to attend to (the layer then returns ``x``).
            encoder_mask: bool ``[b, s, s_e]``, True where text token i may see encoder
                position j (``s_e`` counts the cached positions while decoding). None: every
                text token sees every encoder position.

        Raises:
            ValueError: ``encoder_mask`` is not bool or does not fit ``[b, s, s_e]``.
        """
        cached = self.caches_are_enabled() and self.attn.kv_cache.size > 0
        if encoder_input is None and not cached:
            return x
        if encoder_input is not None and self.caches_are_enabled():
            # A new encoder input replaces the one cached for the previous prompt.
            self.attn.reset_cache()
        sees_any = None
        if encoder_mask is not None:
            s_e = encoder_input.shape[1] if encoder_input is not None else self.attn.kv_cache.size
            _check_encoder_mask(encoder_mask, b=x.shape[0], s=x.shape[1], s_e=s_e)
            sees_any = encoder_mask.any(dim=-1, keepdim=True)  # [b, s, 1]
            if self.empty_rows == "attend_all":
                encoder_mask = encoder_mask | ~sees_any
            encoder_mask = encoder_mask.unsqueeze(1)
        attn_out = self.attn(self.ca_norm(x), encoder_input, mask=encoder_mask)
        if sees_any is not None and self.empty_rows == "skip":
            attn_out = torch.where(sees_any, attn_out, 0.0)
        h = x + self.ca_scale(attn_out)
        mlp_out = self.mlp(self.mlp_norm(h))
        if sees_any is not None:
            mlp_out = torch.where(sees_any, mlp_out, 0.0)
        return h + self.mlp_scale(mlp_out)


def _check_encoder_mask(encoder_mask: Tensor, *, b: int, s: int, s_e: int) -> None:
    if encoder_mask.dtype != torch.bool:
        raise InvalidInputError(
            f"encoder_mask must be bool (True = may attend), got {encoder_mask.dtype}"
        )
    if encoder_mask.dim() != 3 or tuple(encoder_mask.shape) not in ((b, s, s_e), (1, s, s_e)):
        raise InvalidInputError(
            f"encoder_mask of shape {tuple(encoder_mask.shape)} does not fit "
            f"[b, s, s_e] = [{b}, {s}, {s_e}] ({s_e} encoder positions)"
        )


__all__ = [
    "GradientCheckpointingLayer",
    "TanhGate",
    "TransformerCrossAttentionLayer",
    "TransformerSelfAttentionLayer",
]
