"""Llama 3.2 Vision (transformers' Mllama): its configuration and the builder config -> model.

The text model is a Llama decoder whose stack transformers interleaves with gated
cross-attention layers at ``cross_attention_layers``. Here, as in torchtune, each
cross-attention layer is fused (``FusionLayer``, run first) into the self-attention layer that
follows it, so the decoder keeps the plain Llama layer numbering; ``MllamaConfig`` converts
between the two numberings. The image encoder is a ``TiledVisionTransformer``.

Inputs, mirroring transformers' ``pixel_values``/``aspect_ratio_ids``/``aspect_ratio_mask``
and ``cross_attention_mask``::

    model(
        tokens,
        encoder_input={"images": images,                        # [b, n_images, T, c, h, w]
                       "aspect_ratio_ids": aspect_ratio_ids,     # [b, n_images]
                       "aspect_ratio_mask": aspect_ratio_mask},  # [b, n_images, T]
        encoder_mask=mllama_encoder_mask(cross_attention_mask,   # [b, s, n_images, T]
                                         tokens_per_tile=config.vision.tokens_per_tile),
    )
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusionlm.models.llama import ACTIVATIONS, LlamaConfig, llama_layer, llama_mlp, llama_rope
from fusionlm.models.vision import PatchEmbedding, TiledVisionTransformer, vision_layer
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.fusion import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    register_fusion_module,
)
from fusionlm.modules.layers import TanhGate, TransformerCrossAttentionLayer
from fusionlm.modules.norm import RMSNorm

# MllamaTextConfig's defaults where they differ from Llama's, for config.json files that omit them.
_TEXT_DEFAULTS = {"rope_theta": 500_000.0, "max_position_embeddings": 131_072}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MllamaVisionConfig:
    """The tiled image encoder, in transformers' ``MllamaVisionConfig`` field names."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = (
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 1),
        (2, 2),
        (3, 1),
        (4, 1),
    )
    vision_output_dim: int = 7680
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        if self.vision_output_dim != expected:
            raise ValueError(
                f"vision_output_dim {self.vision_output_dim} must be hidden_size * (1 + number "
                f"of intermediate layers) = {expected}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported vision hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}"
            )

    @property
    def tokens_per_tile(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> MllamaVisionConfig:
        """Read a ``vision_config`` dict; absent fields take transformers' defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        for key in ("image_size", "patch_size"):
            if isinstance(values.get(key), (list, tuple)):
                height, width = values[key]
                if height != width:
                    raise ValueError(f"non-square vision {key} {values[key]} is not supported")
                values[key] = height
        if "intermediate_layers_indices" in values:
            values["intermediate_layers_indices"] = tuple(values["intermediate_layers_indices"])
        if "supported_aspect_ratios" in values:
            values["supported_aspect_ratios"] = tuple(
                tuple(ratio) for ratio in values["supported_aspect_ratios"]
            )
        return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MllamaConfig:
    """Llama 3.2 Vision: a text decoder, a tiled image encoder and where they meet.

    Attributes:
        text: the decoder's self-attention layers; ``text.num_hidden_layers`` counts only them.
        vision: the image encoder.
        cross_attention_layers: transformers' indices of the cross-attention layers in its
            interleaved stack of ``num_hidden_layers`` layers.
        image_token_index: the ``<|image|>`` token id.
        num_fusion_tokens: embedding rows after the text vocabulary (transformers' ``+ 8``).
    """

    text: LlamaConfig
    vision: MllamaVisionConfig
    cross_attention_layers: tuple[int, ...]
    image_token_index: int = 128_256
    num_fusion_tokens: int = 8

    def __post_init__(self) -> None:
        cross = self.cross_attention_layers
        if list(cross) != sorted(set(cross)):
            raise ValueError(f"cross_attention_layers must be increasing, got {list(cross)}")
        # Each cross-attention layer is fused into the self-attention layer right after it.
        unpaired = [i for i in cross if i + 1 in cross or not 0 <= i < self.num_hidden_layers - 1]
        if unpaired:
            raise ValueError(
                f"cross-attention layers {unpaired} are not followed by a self-attention layer "
                f"in the stack of {self.num_hidden_layers}; fusionlm fuses each into the next one"
            )
        if not 0 <= self.image_token_index < self.text.vocab_size + self.num_fusion_tokens:
            raise ValueError(
                f"image_token_index {self.image_token_index} is outside the embedding rows "
                f"[0, {self.text.vocab_size + self.num_fusion_tokens})"
            )

    @property
    def num_hidden_layers(self) -> int:
        """transformers' count: self-attention plus cross-attention layers."""
        return self.text.num_hidden_layers + len(self.cross_attention_layers)

    @property
    def fused_layers(self) -> tuple[int, ...]:
        """Our indices of the layers holding a fused cross-attention layer."""
        return tuple(self.from_hf_layer(i)[0] for i in self.cross_attention_layers)

    def from_hf_layer(self, hf_index: int) -> tuple[int, bool]:
        """(our layer, whether it is that layer's fused cross-attention) for transformers' layer."""
        shift = sum(i < hf_index for i in self.cross_attention_layers)
        return hf_index - shift, hf_index in self.cross_attention_layers

    def to_hf_layer(self, index: int, *, fused: bool) -> int:
        """transformers' index of our layer ``index`` (or of the cross-attention fused into it).

        Raises:
            ValueError: no such layer.
        """
        cross = set(self.cross_attention_layers)
        self_layers = [i for i in range(self.num_hidden_layers) if i not in cross]
        if not 0 <= index < len(self_layers) or (fused and self_layers[index] - 1 not in cross):
            kind = "fused cross-attention layer" if fused else "layer"
            raise ValueError(f"there is no {kind} at index {index}")
        return self_layers[index] - 1 if fused else self_layers[index]

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> MllamaConfig:
        """Read a transformers ``config.json`` dict of ``model_type == "mllama"``.

        Raises:
            ValueError: a missing ``text_config``, a missing field or an unsupported value.
        """
        if not isinstance(config.get("text_config"), Mapping):
            raise ValueError("an Mllama config.json needs a text_config object")
        text = {**_TEXT_DEFAULTS, **config["text_config"]}
        cross = tuple(text.get("cross_attention_layers") or ())
        if "num_hidden_layers" not in text:
            raise ValueError(
                "config.json text_config is missing required field 'num_hidden_layers'"
            )
        llama_fields = {
            **text,
            "num_hidden_layers": text["num_hidden_layers"] - len(cross),
            # transformers' Mllama never ties: lm_head has 8 rows fewer than embed_tokens.
            "tie_word_embeddings": False,
            "attention_dropout": text.get("dropout", 0.0),
        }
        return cls(
            text=LlamaConfig.from_hf(llama_fields),
            vision=MllamaVisionConfig.from_hf(config.get("vision_config") or {}),
            cross_attention_layers=cross,
            image_token_index=config.get("image_token_index", 128_256),
        )


def mllama_encoder_mask(cross_attention_mask: Tensor, *, tokens_per_tile: int) -> Tensor:
    """Our ``encoder_mask`` from transformers' ``cross_attention_mask``.

    Args:
        cross_attention_mask: ``[b, s, n_images, T]``, nonzero where text token i may see the
            tile (as the Mllama processor makes it: a token sees the tiles of the images whose
            ``<|image|>`` token precedes it).
        tokens_per_tile: ``config.vision.tokens_per_tile``.

    Returns:
        bool ``[b, s, n_images * T * tokens_per_tile]`` in the encoder's output order.
    """
    if cross_attention_mask.dim() != 4:
        raise ValueError(
            "cross_attention_mask must be [b, s, n_images, n_tiles], got shape "
            f"{tuple(cross_attention_mask.shape)}"
        )
    b, s = cross_attention_mask.shape[:2]
    tiles = cross_attention_mask.bool().repeat_interleave(tokens_per_tile, dim=3)
    return tiles.reshape(b, s, -1)


def llama3_2_vision(
    config: MllamaConfig,
    *,
    attn_backend: str = "sdpa",
    max_seq_len: int | None = None,
    init_weights: bool = True,
) -> DeepFusionModel:
    """Build a Llama 3.2 Vision model.

    Args:
        config: the architecture.
        attn_backend: attention backend name (see ``ATTENTION_BACKENDS``).
        max_seq_len: override the text context (default ``config.text.max_seq_len``).
        init_weights: False creates parameters on the meta device, for a loader that assigns
            checkpoint tensors right after.
    """
    text = config.text
    max_seq_len = max_seq_len if max_seq_len is not None else text.max_seq_len
    rope = llama_rope(text, max_seq_len=max_seq_len)
    with contextlib.nullcontext() if init_weights else torch.device("meta"):
        layers: list[nn.Module] = [
            llama_layer(text, rope=rope, attn_backend=attn_backend, max_seq_len=max_seq_len)
            for _ in range(text.num_hidden_layers)
        ]
        for i in config.fused_layers:
            layers[i] = FusionLayer(layers[i], _cross_attention_layer(text, attn_backend))
        decoder = TransformerDecoder(
            tok_embeddings=FusionEmbedding(
                text.vocab_size, config.num_fusion_tokens, text.hidden_size
            ),
            layers=layers,
            max_seq_len=max_seq_len,
            num_heads=text.num_attention_heads,
            head_dim=text.head_dim,
            norm=RMSNorm(text.hidden_size, eps=text.rms_norm_eps),
            output=nn.Linear(text.hidden_size, text.vocab_size, bias=False),
        )
        encoder = _vision_encoder(
            config.vision, out_dim=text.hidden_size, attn_backend=attn_backend
        )
        model = DeepFusionModel(decoder, encoder)
    model.config = config
    return model


def _cross_attention_layer(text: LlamaConfig, attn_backend: str) -> TransformerCrossAttentionLayer:
    d, h, h_kv, hd = (
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
    )
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=h,
        num_kv_heads=h_kv,
        head_dim=hd,
        q_proj=nn.Linear(d, h * hd, bias=False),
        k_proj=nn.Linear(d, h_kv * hd, bias=False),
        v_proj=nn.Linear(d, h_kv * hd, bias=False),
        output_proj=nn.Linear(h * hd, d, bias=False),
        q_norm=RMSNorm(hd, eps=text.rms_norm_eps),
        k_norm=RMSNorm(hd, eps=text.rms_norm_eps),
        is_causal=False,
        attn_dropout=text.attention_dropout,
        backend=attn_backend,
    )
    return TransformerCrossAttentionLayer(
        attn,
        llama_mlp(text),
        ca_norm=RMSNorm(d, eps=text.rms_norm_eps),
        mlp_norm=RMSNorm(d, eps=text.rms_norm_eps),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
        # transformers lets a text row that sees no image (text before the first <|image|>)
        # attend to every image token, where Meta's reference code zeroes it
        # (huggingface/transformers#39379); we reproduce transformers, the parity reference.
        empty_rows="attend_all",
    )


def _vision_encoder(
    config: MllamaVisionConfig, *, out_dim: int, attn_backend: str
) -> TiledVisionTransformer:
    def layers(count: int, *, gated: bool) -> list[nn.Module]:
        return [
            vision_layer(
                embed_dim=config.hidden_size,
                num_heads=config.attention_heads,
                intermediate_size=config.intermediate_size,
                norm_eps=config.norm_eps,
                activation=ACTIVATIONS[config.hidden_act](),
                gated=gated,
                attn_backend=attn_backend,
            )
            for _ in range(count)
        ]

    projection = nn.Linear(config.vision_output_dim, out_dim)
    register_fusion_module(projection)
    return TiledVisionTransformer(
        patch_embedding=PatchEmbedding(
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=config.num_channels,
            embed_dim=config.hidden_size,
        ),
        layers=layers(config.num_hidden_layers, gated=False),
        global_layers=layers(config.num_global_layers, gated=True),
        projection=projection,
        hidden_layers=config.intermediate_layers_indices,
        max_num_tiles=config.max_num_tiles,
        num_aspect_ratios=len(config.supported_aspect_ratios) + 1,
        # transformers builds these two with LayerNorm's default eps, not norm_eps.
        pre_norm=nn.LayerNorm(config.hidden_size),
        post_norm=nn.LayerNorm(config.hidden_size),
    )


__all__ = ["MllamaConfig", "MllamaVisionConfig", "llama3_2_vision", "mllama_encoder_mask"]
