"""Deep fusion: a pretrained encoder joined to a pretrained decoder inside its layers.

The pieces added for the fusion (cross-attention layers, extra token rows, a projection
head) are *fusion modules*: ``register_fusion_module`` marks them, ``get_fusion_params``
finds their parameters, and ``DeepFusionModel`` trains them while the pretrained halves stay
frozen by default. ``FusionLayer`` and ``FusionEmbedding`` keep the state-dict names of what
they wrap, so the pretrained decoder's checkpoint loads into the fused model unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.layers import GradientCheckpointingLayer
from fusionlm.modules.masks import AttentionMask

_FUSION_MARK = "_is_fusion_module"


def register_fusion_module(module: nn.Module) -> None:
    """Mark every parameter of ``module`` as a fusion parameter (see ``get_fusion_params``)."""
    setattr(module, _FUSION_MARK, True)


def get_fusion_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of every registered fusion module in ``model``, by qualified name."""
    return {
        f"{module_name}.{name}" if module_name else name: param
        for module_name, module in model.named_modules()
        if getattr(module, _FUSION_MARK, False)
        for name, param in module.named_parameters()
    }


def set_trainable_params(model: nn.Module, names: Iterable[str]) -> None:
    """Let exactly the parameters named in ``names`` (as in ``named_parameters``) train.

    Raises:
        ValueError: a name that is not a parameter of ``model``.
    """
    names = set(names)
    params = dict(model.named_parameters())
    unknown = sorted(names - set(params))
    if unknown:
        raise InvalidInputError(f"not parameters of the model: {unknown[:10]}")
    for name, param in params.items():
        param.requires_grad_(name in names)


def _hide_child_on_save(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any, *, child: str
) -> None:
    inner = f"{prefix}{child}."
    # Re-insert every key of this module so their relative order is kept.
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict.pop(key)
        state_dict[prefix + key[len(inner) :] if key.startswith(inner) else key] = value


def _restore_child_on_load(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
    child: str,
) -> None:
    children = {name for name, _ in module.named_children()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].split(".", 1)[0] not in children:
            state_dict[f"{prefix}{child}.{key[len(prefix) :]}"] = state_dict.pop(key)


def _flatten_child_in_state_dict(module: nn.Module, child: str) -> None:
    """Save and load ``module.<child>.*`` entries as ``module.*``."""
    module.register_state_dict_post_hook(functools.partial(_hide_child_on_save, child=child))
    module.register_load_state_dict_pre_hook(functools.partial(_restore_child_on_load, child=child))


class FusionLayer(GradientCheckpointingLayer):
    """A pretrained decoder layer with a new layer (usually cross-attention) run beside it.

    ``layer``'s state-dict keys stay what they were unwrapped (``layers.3.attn.q_proj.weight``,
    not ``layers.3.layer.attn...``); ``fusion_layer``'s appear under ``fusion_layer.`` and are
    registered as fusion parameters. Both follow the layer protocol of ``layers.py``.

    Args:
        layer: the pretrained layer.
        fusion_layer: the new layer.
        fusion_first: run ``fusion_layer`` before ``layer`` (else after).
    """

    def __init__(
        self, layer: nn.Module, fusion_layer: nn.Module, *, fusion_first: bool = True
    ) -> None:
        super().__init__()
        self.layer = layer
        self.fusion_layer = fusion_layer
        self.fusion_first = fusion_first
        register_fusion_module(fusion_layer)
        _flatten_child_in_state_dict(self, "layer")

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Set up both layers' caches (see ``TransformerDecoder.setup_caches``)."""
        for part in (self.layer, self.fusion_layer):
            part.setup_caches(
                batch_size,
                dtype,
                encoder_max_seq_len=encoder_max_seq_len,
                decoder_max_seq_len=decoder_max_seq_len,
                fixed_shape=fixed_shape,
            )

    def caches_are_setup(self) -> bool:
        return self.layer.caches_are_setup() and self.fusion_layer.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.layer.caches_are_enabled() and self.fusion_layer.caches_are_enabled()

    def reset_cache(self) -> None:
        self.layer.reset_cache()
        self.fusion_layer.reset_cache()

    def forward(
        self,
        x: Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``[b, s, d] -> [b, s, d]``; both layers get every argument and use theirs."""
        parts = (
            (self.fusion_layer, self.layer)
            if self.fusion_first
            else (self.layer, self.fusion_layer)
        )
        for part in parts:
            x = part(
                x,
                mask=mask,
                encoder_input=encoder_input,
                encoder_mask=encoder_mask,
                input_pos=input_pos,
            )
        return x


class FusionEmbedding(nn.Module):
    """A token embedding with ``fusion_vocab_size`` new rows after a pretrained vocabulary.

    Ids in ``[0, vocab_size)`` read the pretrained table (key ``weight``, as a plain
    ``nn.Embedding`` saves it), ids in ``[vocab_size, num_embeddings)`` the new rows (key
    ``fusion_embedding.weight``, a fusion parameter). Both tables are looked up with clamped
    ids and the result selected elementwise, so shapes never depend on the data and the
    module compiles without graph breaks.

    Args:
        vocab_size: rows of the pretrained vocabulary.
        fusion_vocab_size: new rows.
        embed_dim: width ``d``.
    """

    def __init__(self, vocab_size: int, fusion_vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.fusion_embedding = nn.Embedding(fusion_vocab_size, embed_dim)
        self.vocab_size = vocab_size
        self.num_embeddings = vocab_size + fusion_vocab_size
        self.embedding_dim = embed_dim
        register_fusion_module(self.fusion_embedding)
        _flatten_child_in_state_dict(self, "embedding")

    @property
    def weight(self) -> Tensor:
        """The pretrained table ``[vocab_size, d]``, saved under this name."""
        return self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """``[b, s]`` ids in ``[0, num_embeddings)`` -> ``[b, s, d]``."""
        is_fusion = (tokens >= self.vocab_size).unsqueeze(-1)
        pretrained = self.embedding(tokens.clamp(max=self.vocab_size - 1))
        fused = self.fusion_embedding((tokens - self.vocab_size).clamp(min=0))
        return torch.where(is_fusion, fused, pretrained)


class DeepFusionModel(nn.Module):
    """An encoder whose output a decoder reads through its fusion layers (torchtune's API).

    Same methods and forward signature as ``TransformerDecoder``, so it is usable wherever a
    decoder is. Trainability is set once here: by default only fusion parameters (see
    ``register_fusion_module``) train; the pretrained encoder and decoder are frozen.

    Args:
        decoder: a ``TransformerDecoder`` with fusion layers.
        encoder: called as ``encoder(**encoder_input)`` -> ``[b, s_e, d]``.
        decoder_trainable: train the decoder's own parameters.
        encoder_trainable: train the encoder's own parameters.
        fusion_trainable: train the fusion parameters (wherever they live).
        config: the architecture the model was built from (such as ``MllamaConfig``), kept
            as ``model.config``; None for a model assembled by hand.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        encoder: nn.Module,
        *,
        decoder_trainable: bool = False,
        encoder_trainable: bool = False,
        fusion_trainable: bool = True,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.decoder = decoder
        self.encoder = encoder
        trainable = set()
        if decoder_trainable:
            trainable |= {f"decoder.{name}" for name, _ in decoder.named_parameters()}
        if encoder_trainable:
            trainable |= {f"encoder.{name}" for name, _ in encoder.named_parameters()}
        fusion = set(get_fusion_params(self))
        trainable = trainable | fusion if fusion_trainable else trainable - fusion
        set_trainable_params(self, trainable)

    # -- the decoder's surface -------------------------------------------------------------

    @property
    def max_seq_len(self) -> int:
        return self.decoder.max_seq_len

    @property
    def tok_embeddings(self) -> nn.Module:
        return self.decoder.tok_embeddings

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None:
        """Allocate the decoder's caches: ``decoder_max_seq_len`` slots for self-attention,
        ``encoder_max_seq_len`` for cross-attention (see ``TransformerDecoder.setup_caches``)."""
        self.decoder.setup_caches(
            batch_size,
            dtype,
            encoder_max_seq_len=encoder_max_seq_len,
            decoder_max_seq_len=decoder_max_seq_len,
            fixed_shape=fixed_shape,
        )

    def caches_are_setup(self) -> bool:
        return self.decoder.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        """Empty every cache, keeping the allocations. RuntimeError before ``setup_caches``."""
        self.decoder.reset_caches()

    def remove_caches(self) -> None:
        """Free every KV cache; ``forward`` then needs no ``input_pos`` again."""
        self.decoder.remove_caches()

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        self.decoder.set_num_output_chunks(num_output_chunks)

    def chunked_output(self, last_hidden_state: Tensor) -> list[Tensor]:
        return self.decoder.chunked_output(last_hidden_state)

    def forward(
        self,
        tokens: Tensor,
        *,
        mask: AttentionMask | None = None,
        encoder_input: Mapping[str, Tensor] | None = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor | list[Tensor]:
        """Logits for ``tokens``, reading the encoded ``encoder_input``.

        Args:
            tokens: ``[b, s]``.
            mask: self-attention mask, as for ``TransformerDecoder``.
            encoder_input: the encoder's keyword arguments (e.g. ``{"images": ...}``); None
                for text only, or while decoding from the cross-attention caches.
            encoder_mask: bool ``[b, s, s_e]``, True where token i may see encoder position j.
            input_pos: positions ``[b, s]``, as for ``TransformerDecoder``.
            logits_to_keep: as for ``TransformerDecoder``.

        Returns:
            as ``TransformerDecoder.forward``.

        Raises:
            TypeError: ``encoder_input`` is not a mapping of keyword arguments.
            ValueError: as ``TransformerDecoder.forward`` (including encoder input given to a
                decoder without fusion layers, or an encoder mask that does not fit).
        """
        embeds = None
        if encoder_input is not None:
            if not isinstance(encoder_input, Mapping):
                raise TypeError(
                    "encoder_input must be a dict of the encoder's keyword arguments, got "
                    f"{type(encoder_input).__name__}"
                )
            embeds = self.encoder(**encoder_input)
        return self.decoder(
            tokens,
            mask=mask,
            encoder_input=embeds,
            encoder_mask=encoder_mask,
            input_pos=input_pos,
            logits_to_keep=logits_to_keep,
        )


__all__ = [
    "DeepFusionModel",
    "FusionEmbedding",
    "FusionLayer",
    "get_fusion_params",
    "register_fusion_module",
    "set_trainable_params",
]
