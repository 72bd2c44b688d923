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
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.images import ImageLike, pillow, to_pil
from fusionlm.models.cross_attention import gated_cross_attention_layer
from fusionlm.models.llama import ACTIVATIONS, LlamaConfig, llama_layer, llama_mlp, llama_rope
from fusionlm.models.vision import PatchEmbedding, TiledVisionTransformer, vision_layer
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.fusion import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    register_fusion_module,
)
from fusionlm.modules.layers import TransformerCrossAttentionLayer
from fusionlm.modules.norm import RMSNorm

# The image normalisation of the published Llama 3.2 Vision checkpoints (CLIP's).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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
            raise InvalidInputError(
                f"vision_output_dim {self.vision_output_dim} must be hidden_size * (1 + number "
                f"of intermediate layers) = {expected}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise InvalidInputError(
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
                    raise InvalidInputError(
                        f"non-square vision {key} {values[key]} is not supported"
                    )
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
        image_mean, image_std: per-channel normalisation of images scaled to ``[0, 1]``
            (``preprocessor_config.json``; the published checkpoints use CLIP's).
    """

    text: LlamaConfig
    vision: MllamaVisionConfig
    cross_attention_layers: tuple[int, ...]
    image_token_index: int = 128_256
    num_fusion_tokens: int = 8
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        cross = self.cross_attention_layers
        if list(cross) != sorted(set(cross)):
            raise InvalidInputError(f"cross_attention_layers must be increasing, got {list(cross)}")
        # Each cross-attention layer is fused into the self-attention layer right after it.
        unpaired = [i for i in cross if i + 1 in cross or not 0 <= i < self.num_hidden_layers - 1]
        if unpaired:
            raise InvalidInputError(
                f"cross-attention layers {unpaired} are not followed by a self-attention layer "
                f"in the stack of {self.num_hidden_layers}; fusionlm fuses each into the next one"
            )
        channels = self.vision.num_channels
        if len(self.image_mean) != channels or len(self.image_std) != channels:
            raise InvalidInputError(
                f"image_mean {list(self.image_mean)} and image_std {list(self.image_std)} need "
                f"one value per image channel ({channels})"
            )
        if not 0 <= self.image_token_index < self.text.vocab_size + self.num_fusion_tokens:
            raise InvalidInputError(
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
            raise InvalidInputError(f"there is no {kind} at index {index}")
        return self_layers[index] - 1 if fused else self_layers[index]

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], *, preprocessor: Mapping[str, Any] | None = None
    ) -> MllamaConfig:
        """Read a transformers ``config.json`` dict of ``model_type == "mllama"``.

        ``preprocessor`` is the directory's ``preprocessor_config.json``, if it has one: its
        ``image_mean``/``image_std`` are used (CLIP's otherwise).

        Raises:
            ValueError: a missing ``text_config``, a missing field or an unsupported value.
        """
        if not isinstance(config.get("text_config"), Mapping):
            raise InvalidInputError("an Mllama config.json needs a text_config object")
        text = {**_TEXT_DEFAULTS, **config["text_config"]}
        cross = tuple(text.get("cross_attention_layers") or ())
        if "num_hidden_layers" not in text:
            raise InvalidInputError(
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
            image_mean=tuple((preprocessor or {}).get("image_mean") or OPENAI_CLIP_MEAN),
            image_std=tuple((preprocessor or {}).get("image_std") or OPENAI_CLIP_STD),
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
        raise InvalidInputError(
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
            config=text,
        )
        encoder = _vision_encoder(
            config.vision, out_dim=text.hidden_size, attn_backend=attn_backend
        )
        model = DeepFusionModel(decoder, encoder, config=config)
    return model


def _cross_attention_layer(text: LlamaConfig, attn_backend: str) -> TransformerCrossAttentionLayer:
    return gated_cross_attention_layer(
        embed_dim=text.hidden_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        encoder_dim=text.hidden_size,
        mlp=llama_mlp(text),
        norm_eps=text.rms_norm_eps,
        attn_dropout=text.attention_dropout,
        # transformers lets a text row that sees no image (text before the first <|image|>)
        # attend to every image token, where Meta's reference code zeroes it
        # (huggingface/transformers#39379); we reproduce transformers, the parity reference.
        empty_rows="attend_all",
        attn_backend=attn_backend,
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


# -- images in, encoder inputs out (what transformers' MllamaProcessor computes) -------------


def _canvas_tiles(
    height: int, width: int, *, aspect_ratios: Sequence[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """The tile layout ``(rows, cols)`` an image of this size is resized into.

    The layout needing the least upscaling, or if every layout needs downscaling, the least
    downscaling; among equals the smallest canvas (first listed on a tie).
    """
    scales = [
        min(rows * tile_size / height, cols * tile_size / width) for rows, cols in aspect_ratios
    ]
    upscales = [scale for scale in scales if scale >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [
        ratio for ratio, scale in zip(aspect_ratios, scales, strict=True) if scale == chosen
    ]
    return min(candidates, key=lambda ratio: ratio[0] * ratio[1])


def _fit_to_canvas(
    height: int, width: int, *, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """The size ``(h, w)`` an image is resized to: aspect ratio kept, between one tile and the
    canvas on each side."""
    target_height = min(max(height, tile_size), canvas_height)
    target_width = min(max(width, tile_size), canvas_width)
    scale_height, scale_width = target_height / height, target_width / width
    if scale_width < scale_height:
        return min(math.floor(height * scale_width) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_height) or 1, target_width)


def mllama_image_tiles(image: ImageLike, config: MllamaConfig) -> tuple[Tensor, int]:
    """One image as the tiles Llama 3.2 Vision reads, as transformers' image processor makes them.

    The image (converted to RGB) is resized with Pillow's bilinear filter, keeping its aspect
    ratio, to fit the best tile layout of ``config.vision.supported_aspect_ratios``; padded
    with black at the bottom and right; scaled to ``[0, 1]``, normalised with
    ``config.image_mean``/``image_std``; and cut into square tiles, row by row.

    Returns:
        tiles ``[rows * cols, c, size, size]`` (float32) and the layout's aspect-ratio id
        (1-based; 0 marks padding images).

    Raises:
        ImportError: no Pillow.
        TypeError, ValueError: not an image (see ``fusionlm.images.to_tensor``).
    """
    Image = pillow()
    vision = config.vision
    size = vision.image_size
    picture = to_pil(image).convert("RGB")
    width, height = picture.size
    ratios = [tuple(ratio) for ratio in vision.supported_aspect_ratios]
    rows, cols = _canvas_tiles(height, width, aspect_ratios=ratios, tile_size=size)
    new_height, new_width = _fit_to_canvas(
        height, width, canvas_height=rows * size, canvas_width=cols * size, tile_size=size
    )
    picture = picture.resize((new_width, new_height), resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    # Black padding before normalisation, and float64 scaling then float32: bit-equal to
    # transformers' processor.
    canvas = torch.zeros(3, rows * size, cols * size, dtype=torch.float64)
    canvas[:, :new_height, :new_width] = pixels
    mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(config.image_std, dtype=torch.float32)[:, None, None]
    canvas = ((canvas * (1 / 255)).float() - mean) / std
    tiles = canvas.reshape(3, rows, size, cols, size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, 3, size, size), ratios.index((rows, cols)) + 1


def mllama_cross_attention_mask(
    prompts: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    num_tiles: Sequence[Sequence[int]],
    max_num_tiles: int,
) -> Tensor:
    """transformers' ``cross_attention_mask`` for left-padded prompts, from their image tokens.

    The image of the k-th ``<|image|>`` token is seen by the tokens from that one up to the
    next image token (exclusive) or the end; a run of adjacent image tokens is seen together up
    to where the run's last image stops being seen. Padding tokens see nothing.

    Args:
        prompts: token ids per prompt; the batch is left-padded to the longest.
        image_token_id: the ``<|image|>`` id.
        num_tiles: per prompt, the tiles of each of its images.
        max_num_tiles: ``T``.

    Returns:
        int64 ``[b, longest, n_images, T]``, 1 where a token sees a tile.

    Raises:
        ValueError: a prompt whose image tokens do not match its number of images.
    """
    longest = max(len(prompt) for prompt in prompts)
    n_images = max((len(tiles) for tiles in num_tiles), default=0)
    mask = torch.zeros(len(prompts), longest, n_images, max_num_tiles, dtype=torch.long)
    for i, (prompt, tiles) in enumerate(zip(prompts, num_tiles, strict=True)):
        offset = longest - len(prompt)
        starts = [offset + j for j, token in enumerate(prompt) if token == image_token_id]
        if len(starts) != len(tiles):
            raise InvalidInputError(
                f"prompt {i} has {len(starts)} <|image|> token(s) (id {image_token_id}) but "
                f"{len(tiles)} image(s): each image needs its image token in the prompt"
            )
        ends = [*starts[1:], longest][: len(starts)]
        for k in range(len(starts) - 2, -1, -1):
            if ends[k] == starts[k] + 1:  # adjacent image tokens share the later one's span
                ends[k] = ends[k + 1]
        for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
            mask[i, start:end, k, : tiles[k]] = 1
    return mask


def mllama_image_inputs(
    config: MllamaConfig,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[ImageLike]],
) -> tuple[dict[str, Tensor], Tensor] | None:
    """Encoder input and mask for a batch of prompts with their images (none, one or several).

    Each prompt holds one ``<|image|>`` token per image, where the image belongs (a chat
    template puts it there for ``{"type": "image"}`` content parts). Images are padded per
    batch to the most any prompt has, as transformers' processor pads them.

    Returns:
        ``(encoder_input, encoder_mask)`` for ``DeepFusionModel.forward``: ``encoder_input``
        holds ``images [b, n_images, T, c, size, size]``, ``aspect_ratio_ids [b, n_images]``
        and ``aspect_ratio_mask [b, n_images, T]``; ``encoder_mask`` is bool
        ``[b, longest, n_images * T * tokens_per_tile]`` for the left-padded prompts. None
        when no prompt has an image.

    Raises:
        ValueError: image tokens that do not match the images; images that are not images.
    """
    tiled = [[mllama_image_tiles(image, config) for image in row] for row in images]
    vision = config.vision
    num_tiles = [[tiles.shape[0] for tiles, _ in row] for row in tiled]
    cross_attention_mask = mllama_cross_attention_mask(
        prompts,
        image_token_id=config.image_token_index,
        num_tiles=num_tiles,
        max_num_tiles=vision.max_num_tiles,
    )
    n_images = cross_attention_mask.shape[2]
    if n_images == 0:
        return None
    b, size = len(prompts), vision.image_size
    pixels = torch.zeros(b, n_images, vision.max_num_tiles, 3, size, size)
    aspect_ratio_ids = torch.zeros(b, n_images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(b, n_images, vision.max_num_tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1  # as transformers' processor marks padding images
    for i, row in enumerate(tiled):
        for k, (tiles, ratio_id) in enumerate(row):
            pixels[i, k, : tiles.shape[0]] = tiles
            aspect_ratio_ids[i, k] = ratio_id
            aspect_ratio_mask[i, k, : tiles.shape[0]] = 1
    encoder_input = {
        "images": pixels,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
    }
    encoder_mask = mllama_encoder_mask(cross_attention_mask, tokens_per_tile=vision.tokens_per_tile)
    return encoder_input, encoder_mask


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MllamaConfig",
    "MllamaVisionConfig",
    "llama3_2_vision",
    "mllama_cross_attention_mask",
    "mllama_encoder_mask",
    "mllama_image_inputs",
    "mllama_image_tiles",
]
