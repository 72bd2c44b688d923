"""TransformerDecoder: embeddings, a stack of layers, a final norm and the output projection."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.kv_cache import KVCache
from fusionlm.modules.layers import GradientCheckpointingLayer, TransformerCrossAttentionLayer
from fusionlm.modules.masks import AttentionMask


class TiedLinear:
    """The output projection of a model whose input and output embeddings are one matrix.

    Deliberately not an ``nn.Module``: the weight belongs to the embedding, so it appears once
    in the state dict, under the embedding's name.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self.tied_module = embedding

    @property
    def weight(self) -> Tensor:
        return self.tied_module.weight

    def __call__(self, x: Tensor) -> Tensor:
        """``[..., d] -> [..., vocab]``."""
        return F.linear(x, self.tied_module.weight)


class TransformerDecoder(nn.Module):
    """A decoder-only transformer with the torchtune ``TransformerDecoder`` API.

    Args:
        tok_embeddings: token ids ``[b, s]`` -> ``[b, s, d]``.
        layers: the layers, or one layer to copy ``num_layers`` times.
        max_seq_len: the longest sequence the model accepts (and the default cache length).
        num_heads: query heads (informational, as in torchtune).
        head_dim: channels per head (informational, as in torchtune).
        norm: the final norm.
        output: ``[b, s, d] -> [b, s, v]``, an ``nn.Linear`` or a ``TiedLinear``.
        num_layers: copies of ``layers`` when it is a single module.
        output_hidden_states: layer indices whose *input* hidden state ``[b, s, d]`` is
            returned before the logits; index 0 is the embedding output. This matches
            transformers' ``hidden_states[i]`` for ``i < num_layers``.
        config: the architecture the model was built from (a builder's config, such as
            ``LlamaConfig``), kept as ``model.config``; None for a model assembled by hand.

    Shapes: b batch, s tokens, d width, v vocabulary, s_e encoder length.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Module,
        layers: nn.Module | Sequence[nn.Module],
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        output: nn.Module | TiedLinear,
        num_layers: int | None = None,
        output_hidden_states: Sequence[int] | None = None,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        if isinstance(layers, nn.ModuleList):
            pass
        elif isinstance(layers, Sequence):
            layers = nn.ModuleList(layers)
        else:
            if num_layers is None:
                raise InvalidInputError(
                    "num_layers is required when a single layer is given to copy"
                )
            layers = nn.ModuleList(copy.deepcopy(layers) for _ in range(num_layers))
        self.tok_embeddings = tok_embeddings
        self.layers = layers
        self.norm = norm
        self.output = output
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_output_chunks = 0
        # True: forward returns the normed hidden states [b, s, d] in place of logits, for a
        # loss that applies the output projection itself (LinearCrossEntropyLoss).
        self.skip_output_layer = False
        self.output_hidden_states = list(output_hidden_states or [])
        bad = [i for i in self.output_hidden_states if not 0 <= i < len(self.layers)]
        if bad:
            raise InvalidInputError(
                f"output_hidden_states {bad} out of range [0, {len(self.layers)})"
            )

    @property
    def vocab_size(self) -> int:
        return self.tok_embeddings.num_embeddings

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the activations and KV caches: the final norm's (the
        embedding and linears may store their weights in another format)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    # -- caches ----------------------------------------------------------------------------

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Allocate KV caches in every layer and enable them.

        Self-attention layers get ``decoder_max_seq_len`` slots (default ``max_seq_len``),
        cross-attention layers ``encoder_max_seq_len``. ``fixed_shape`` makes self-attention
        read the whole cache under a mask of the filled slots, so decode steps keep one shape
        and compile to one graph (see ``KVCache``); the caller keeps within the length.
        """
        decoder_max_seq_len = (
            decoder_max_seq_len if decoder_max_seq_len is not None else self.max_seq_len
        )
        if decoder_max_seq_len > self.max_seq_len:
            raise InvalidInputError(
                f"decoder_max_seq_len {decoder_max_seq_len} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        for layer in self.layers:
            layer.setup_caches(
                batch_size,
                dtype,
                encoder_max_seq_len=encoder_max_seq_len,
                decoder_max_seq_len=decoder_max_seq_len,
                fixed_shape=fixed_shape,
            )

    def caches_are_setup(self) -> bool:
        """True once ``setup_caches`` has allocated the caches."""
        return all(layer.caches_are_setup() for layer in self.layers)

    def caches_are_enabled(self) -> bool:
        """True when caches are set up and not disabled (see ``disable_kv_cache``)."""
        return all(layer.caches_are_enabled() for layer in self.layers)

    def reset_caches(self) -> None:
        """Empty every cache, keeping the allocations. RuntimeError before ``setup_caches``."""
        if not self.caches_are_setup():
            raise RuntimeError("KV caches are not set up; call setup_caches() first")
        for layer in self.layers:
            layer.reset_cache()

    def remove_caches(self) -> None:
        """Free every KV cache; ``forward`` then needs no ``input_pos`` again."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.remove_cache()

    # -- output ----------------------------------------------------------------------------

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Make ``forward`` return the logits as a list of this many sequence chunks (0: off).

        Pairs with ``CEWithChunkedOutputLoss``, which upcasts one chunk at a time.
        """
        if num_output_chunks < 0:
            raise InvalidInputError(f"num_output_chunks must be >= 0, got {num_output_chunks}")
        self.num_output_chunks = num_output_chunks

    def chunked_output(self, last_hidden_state: Tensor) -> list[Tensor]:
        """Apply the output projection chunk by chunk along the sequence.

        Args:
            last_hidden_state: ``[b, s, d]``, after the final norm.

        Returns:
            ``num_output_chunks`` tensors ``[b, ~s / num_output_chunks, v]``.
        """
        if self.num_output_chunks < 1:
            raise RuntimeError("call set_num_output_chunks(n) with n >= 1 before chunked_output")
        return [
            self.output(chunk)
            for chunk in last_hidden_state.tensor_split(self.num_output_chunks, dim=1)
        ]

    def set_gradient_checkpointing(
        self, enable: bool = True, *, every_n_layers: int = 1, use_reentrant: bool = False
    ) -> None:
        """Recompute layer activations in backward for every ``every_n_layers``-th layer."""
        if every_n_layers < 1:
            raise InvalidInputError(f"every_n_layers must be >= 1, got {every_n_layers}")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, GradientCheckpointingLayer):
                layer.gradient_checkpointing = enable and i % every_n_layers == 0
                layer.checkpoint_use_reentrant = use_reentrant

    # -- forward ---------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        logits_to_keep: int = 0,
        active_rows: Tensor | None = None,
    ) -> Tensor | list[Tensor]:
        """Logits for ``tokens``.

        Args:
            tokens: ``[b, s]`` integer ids in ``[0, v)``.
            mask: bool ``[b, s, s]`` (with caches ``[b, s, cache_len]``; True = may attend) or a
                ``BlockMask``. None: causal.
            encoder_input: ``[b, s_e, d_e]`` for cross-attention layers.
            encoder_mask: bool ``[b, s, s_e]``, True where token i may see encoder position j.
            input_pos: positions ``[b, s]`` (or ``[s]`` for every row). Required with caches
                enabled; defaults to ``0..s-1`` otherwise. Packed rows restart positions per
                document; left-padded rows shift them right.
            logits_to_keep: project only the last this-many positions to logits (0: all).
                Generation keeps 1: the output projection is a fifth of a small model's
                FLOPs, wasted on prompt positions whose logits nobody reads.
            active_rows: bool ``[b]``; the other rows carry zeros from the embedding on, and
                their logits mean nothing (a server's idle cache rows in a fixed-size batch:
                zero rows cost fusionlm's matvec kernels nothing).

        Returns:
            ``[b, s, v]`` logits; a list of ``num_output_chunks`` chunks if chunking is set; the
            normed hidden states ``[b, s, d]`` if ``skip_output_layer`` is set; with
            ``output_hidden_states``, the requested ``[b, s, d]`` states followed by the logits.

        Raises:
            TypeError: tokens not an integer tensor.
            ValueError: tokens not ``[b, s]``, ids outside the vocabulary, ``s`` beyond
                ``max_seq_len``, ``input_pos`` missing with caches enabled or of the wrong shape,
                ``encoder_input`` given to a decoder without cross-attention layers.
        """
        b, s = self._check_tokens(tokens)
        if encoder_input is not None and not any(
            isinstance(m, TransformerCrossAttentionLayer) for m in self.layers.modules()
        ):
            raise InvalidInputError(
                "encoder_input was given, but this decoder has no cross-attention (fusion) "
                "layers to read it"
            )
        caching = self.caches_are_enabled()
        if input_pos is None:
            if caching:
                raise InvalidInputError(
                    "input_pos is required when KV caches are enabled: pass the positions [b, s] "
                    "of these tokens, or use disable_kv_cache(model)"
                )
            input_pos = torch.arange(s, device=tokens.device).expand(b, s)
        elif input_pos.dim() == 1:
            input_pos = input_pos.expand(b, -1)
        if input_pos.shape != (b, s):
            raise InvalidInputError(
                f"input_pos must be [b, s] = [{b}, {s}], got {tuple(input_pos.shape)}"
            )

        h = self.tok_embeddings(tokens)
        if active_rows is not None:
            h = torch.where(active_rows[:, None, None], h, 0.0)
        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.output_hidden_states:
                hidden.append(h)
            h = layer(
                h,
                mask=mask,
                encoder_input=encoder_input,
                encoder_mask=encoder_mask,
                input_pos=input_pos,
            )
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        h = self.norm(h)
        if self.skip_output_layer:
            output = h
        elif self.num_output_chunks > 0:
            output = self.chunked_output(h)
        else:
            output = self.output(h)
        return [*hidden, output] if hidden else output

    def _check_tokens(self, tokens: Tensor) -> tuple[int, int]:
        if (
            not isinstance(tokens, Tensor)
            or tokens.is_floating_point()
            or tokens.dtype == torch.bool
        ):
            kind = tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TypeError(f"tokens must be an integer tensor [b, s], got {kind}")
        if tokens.dim() != 2:
            raise InvalidInputError(f"tokens must have shape [b, s], got {tuple(tokens.shape)}")
        b, s = tokens.shape
        if s > self.max_seq_len:
            raise InvalidInputError(
                f"sequence length {s} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        # Checking the ids reads them on the host; a compiled graph (generation's decode step,
        # fed the ids it sampled itself) skips that rather than break the graph.
        if (
            not torch.compiler.is_compiling()
            and tokens.numel()
            and (tokens.min() < 0 or tokens.max() >= self.vocab_size)
        ):
            raise InvalidInputError(
                f"token ids must be in [0, {self.vocab_size}), got min {int(tokens.min())}, max {int(tokens.max())}"
            )
        return b, s


@contextlib.contextmanager
def disable_kv_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` without reading or writing its KV caches, which keep their contents.

    Raises:
        ValueError: the model has no caches set up.
    """
    attns = _cached_attention(model, needed_by="disable_kv_cache")
    previous = [m.cache_enabled for m in attns]
    for m in attns:
        m.cache_enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(attns, previous, strict=True):
            m.cache_enabled = enabled


class CacheRows:
    """Rows of ``model``'s fixed-shape KV caches, each a batch of one: inside ``row(index)``,
    a batch-1 forward reads and writes that row alone, at the row's own write position,
    whatever the other rows hold (a request's prompt joining a batch that is decoding; see
    ``KVCache.row``). The layers are found, and each row's views made, once (finding them
    took ~1 ms a call on the default model); make it after ``setup_caches``.

    Raises:
        ValueError: the model has no caches set up.
        RuntimeError: (``row``) the caches are not ``fixed_shape``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.attns = _cached_attention(model, needed_by="CacheRows")
        self.caches = [m.kv_cache for m in self.attns]
        self.views: dict[int, list[KVCache]] = {}

    @contextlib.contextmanager
    def row(self, index: int) -> Iterator[None]:
        """Run the model on row ``index`` within this context."""
        if index not in self.views:
            self.views[index] = [cache.row(index) for cache in self.caches]
        for m, view in zip(self.attns, self.views[index], strict=True):
            m.kv_cache = view
        try:
            yield
        finally:
            for m, cache in zip(self.attns, self.caches, strict=True):
                m.kv_cache = cache


def slot_cache(model: nn.Module) -> KVCache | None:
    """The cache that speaks for all of ``model``'s enabled fixed-shape self-attention caches,
    or None if it has none: they advance together, so the slots its ``filled_mask`` gives
    are every layer's (a decode step narrows its mask with it once, see
    ``masks_cover_filled_slots``)."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention) and _takes_filled_slot_masks(m):
            return m.kv_cache
    return None


@contextlib.contextmanager
def masks_cover_filled_slots(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model``'s fixed-shape self-attention layers take a bool mask as it is: the
    caller has narrowed it once (``slot_cache``), where each layer would narrow it again
    (in a compiled 8-row decode step over 2048 slots, 1.7 of 11 ms; inductor recomputes a
    mask made inside the graph in every layer that reads it, so the caller narrows it
    outside).

    Raises:
        ValueError: the model has no caches set up.
    """
    attns = _fixed_shape_self_attention(model, needed_by="masks_cover_filled_slots")
    for m in attns:
        m.masks_filled_slots = True
    try:
        yield model
    finally:
        for m in attns:
            m.masks_filled_slots = False


def _fixed_shape_self_attention(model: nn.Module, *, needed_by: str) -> list[MultiHeadAttention]:
    """``model``'s self-attention layers with enabled fixed-shape caches."""
    return [m for m in _cached_attention(model, needed_by=needed_by) if _takes_filled_slot_masks(m)]


def _takes_filled_slot_masks(m: MultiHeadAttention) -> bool:
    """Whether ``m`` is self-attention over an enabled fixed-shape cache."""
    return m.kv_cache is not None and m.is_causal and m.cache_enabled and m.kv_cache.fixed_shape


def _cached_attention(model: nn.Module, *, needed_by: str) -> list[MultiHeadAttention]:
    """The attention layers of ``model`` that have a KV cache; ValueError if none has."""
    attns = [
        m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.kv_cache is not None
    ]
    if not attns:
        raise InvalidInputError(f"{needed_by} needs a model whose caches are set up")
    return attns


__all__ = [
    "CacheRows",
    "TiedLinear",
    "TransformerDecoder",
    "disable_kv_cache",
    "masks_cover_filled_slots",
    "slot_cache",
]
