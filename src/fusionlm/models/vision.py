"""Vision encoders for deep fusion: a ViT, and the tiled ViT of Llama 3.2 Vision.

Both end in a projection head (a fusion module) to the decoder's width and return the
encoder sequence a cross-attention layer reads, ``[b, s_e, d]``, images in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.feed_forward import FeedForward
from fusionlm.modules.fusion import register_fusion_module
from fusionlm.modules.layers import TanhGate, TransformerSelfAttentionLayer


class PatchEmbedding(nn.Module):
    """Non-overlapping square patches, each projected to ``d``: ``[..., c, h, w] -> [..., p, d]``.

    Args:
        image_size: height and width the encoder was built for.
        patch_size: side of a patch; divides ``image_size``.
        num_channels: ``c``.
        embed_dim: ``d``.
        bias: a bias on the projection.
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        num_channels: int,
        embed_dim: int,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise InvalidInputError(
                f"patch_size {patch_size} does not divide image_size {image_size}"
            )
        self.image_size = image_size
        self.num_channels = num_channels
        self.embed_dim = embed_dim
        self.num_patches = (image_size // patch_size) ** 2
        self.conv = nn.Conv2d(
            num_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias
        )

    def forward(self, images: Tensor) -> Tensor:
        """Raises ValueError for images of another size or channel count."""
        expected = (self.num_channels, self.image_size, self.image_size)
        if images.dim() < 3 or tuple(images.shape[-3:]) != expected:
            raise InvalidInputError(
                f"expected images [..., c, h, w] = [..., {', '.join(map(str, expected))}], "
                f"got shape {tuple(images.shape)}"
            )
        lead = images.shape[:-3]
        patches = self.conv(images.reshape(-1, *expected).to(self.conv.weight.dtype))
        return patches.flatten(2).transpose(1, 2).reshape(*lead, self.num_patches, -1)


def vision_layer(
    *,
    embed_dim: int,
    num_heads: int,
    intermediate_size: int,
    norm_eps: float = 1e-5,
    activation: nn.Module | None = None,
    attention_bias: bool = False,
    gated: bool = False,
    attn_backend: str = "sdpa",
) -> TransformerSelfAttentionLayer:
    """A pre-norm ViT layer: LayerNorm, bidirectional attention, LayerNorm, two-layer MLP.

    Args:
        activation: the MLP's nonlinearity (exact GELU by default).
        attention_bias: biases on the q/k/v/output projections.
        gated: ``TanhGate`` on both residual branches.
    """
    d, head_dim = embed_dim, embed_dim // num_heads
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(d, d, bias=attention_bias),
        k_proj=nn.Linear(d, d, bias=attention_bias),
        v_proj=nn.Linear(d, d, bias=attention_bias),
        output_proj=nn.Linear(d, d, bias=attention_bias),
        is_causal=False,
        backend=attn_backend,
    )
    mlp = FeedForward(
        gate_proj=nn.Linear(d, intermediate_size),
        down_proj=nn.Linear(intermediate_size, d),
        activation=activation if activation is not None else nn.GELU(),
    )
    return TransformerSelfAttentionLayer(
        attn,
        mlp,
        sa_norm=nn.LayerNorm(d, eps=norm_eps),
        mlp_norm=nn.LayerNorm(d, eps=norm_eps),
        sa_scale=TanhGate() if gated else None,
        mlp_scale=TanhGate() if gated else None,
    )


def _run_layers(
    layers: nn.ModuleList, x: Tensor, *, mask: Tensor | None, keep: Sequence[int]
) -> tuple[Tensor, list[Tensor]]:
    """``x`` through every layer; also the outputs of the layers numbered in ``keep``."""
    kept = {}
    for i, layer in enumerate(layers):
        x = layer(x, mask=mask)
        if i in keep:
            kept[i] = x
    return x, [kept[i] for i in keep]


def _prepend_class_token(class_embedding: Tensor, x: Tensor) -> Tensor:
    """``[n, p, d] -> [n, 1 + p, d]``."""
    return torch.cat([class_embedding.expand(x.shape[0], 1, -1), x], dim=1)


def _check_hidden_layers(hidden_layers: Sequence[int], num_layers: int) -> None:
    bad = [i for i in hidden_layers if not 0 <= i < num_layers]
    if bad:
        raise InvalidInputError(f"hidden layer indices {bad} out of range [0, {num_layers})")


class VisionTransformer(nn.Module):
    """A ViT (CLIP-style) with a projection head.

    Patches plus a class token plus learned positions, a pre-norm, the layers, a post-norm;
    the final states are concatenated on the feature axis with the outputs of the layers in
    ``hidden_layers`` (``d * (1 + len(hidden_layers))`` features) and projected.

    Args:
        patch_embedding: images to patch vectors.
        layers: the transformer layers (``vision_layer``).
        projection: ``[..., d * (1 + len(hidden_layers))] -> [..., d_out]``.
        hidden_layers: indices of layers whose outputs are also returned.
        pre_norm, post_norm: around the layers (identity if None).
    """

    def __init__(
        self,
        *,
        patch_embedding: PatchEmbedding,
        layers: Sequence[nn.Module],
        projection: nn.Module,
        hidden_layers: Sequence[int] = (),
        pre_norm: nn.Module | None = None,
        post_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_hidden_layers(hidden_layers, len(layers))
        d = patch_embedding.embed_dim
        self.patch_embedding = patch_embedding
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.position_embedding = nn.Parameter(
            torch.randn(patch_embedding.num_patches + 1, d) * d**-0.5
        )
        self.pre_norm = pre_norm if pre_norm is not None else nn.Identity()
        self.layers = nn.ModuleList(layers)
        self.post_norm = post_norm if post_norm is not None else nn.Identity()
        self.hidden_layers = list(hidden_layers)
        self.projection = projection

    @property
    def tokens_per_image(self) -> int:
        return self.patch_embedding.num_patches + 1

    def forward(self, images: Tensor) -> Tensor:
        """``[b, n_images, c, h, w] -> [b, n_images * tokens_per_image, d_out]``.

        Raises:
            ValueError: images not 5-D, or of the wrong size or channel count.
        """
        if images.dim() != 5:
            raise InvalidInputError(
                f"images must be [b, n_images, c, h, w], got shape {tuple(images.shape)}"
            )
        b, n = images.shape[:2]
        x = self.patch_embedding(images).flatten(0, 1)
        x = _prepend_class_token(self.class_embedding, x) + self.position_embedding
        x, hidden = _run_layers(self.layers, self.pre_norm(x), mask=None, keep=self.hidden_layers)
        x = torch.cat([self.post_norm(x), *hidden], dim=-1)
        return self.projection(x).reshape(b, n * self.tokens_per_image, -1)


def vision_transformer(
    *,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    out_dim: int,
    num_channels: int = 3,
    hidden_layers: Sequence[int] = (),
    norm_eps: float = 1e-5,
    attn_backend: str = "sdpa",
) -> VisionTransformer:
    """A ``VisionTransformer`` whose linear projection to ``out_dim`` is a fusion module."""
    projection = nn.Linear(embed_dim * (1 + len(hidden_layers)), out_dim)
    register_fusion_module(projection)
    return VisionTransformer(
        patch_embedding=PatchEmbedding(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=num_channels,
            embed_dim=embed_dim,
        ),
        layers=[
            vision_layer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                intermediate_size=intermediate_size,
                norm_eps=norm_eps,
                attn_backend=attn_backend,
            )
            for _ in range(num_layers)
        ],
        projection=projection,
        hidden_layers=hidden_layers,
        pre_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
        post_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
    )


# -- Llama 3.2 Vision ----------------------------------------------------------------------


class TileEmbedding(nn.Module):
    """A gated embedding per tile, looked up by the image's aspect-ratio id.

    Args:
        num_aspect_ratios: ids, 0 (padding) included.
        max_num_tiles: tiles ``T`` per image.
        embed_dim: ``d``.
    """

    def __init__(self, *, num_aspect_ratios: int, max_num_tiles: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_aspect_ratios, max_num_tiles * embed_dim)
        self.gate = TanhGate()

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """``x [m, T, p, d]``, ``aspect_ratio_ids [m]`` -> ``[m, T, p, d]``."""
        m, tiles, _, d = x.shape
        return x + self.gate(self.embedding(aspect_ratio_ids).view(m, tiles, 1, d))


class TilePositionEmbedding(nn.Module):
    """Token positions: a shared table blended by a tanh gate into a per-tile table.

    ``x + (1 - tanh g) * shared + tanh g * per_tile[aspect_ratio_id]``; the per-tile table
    gives every token of every tile its own vector for each aspect ratio.

    Args:
        num_aspect_ratios: ids, 0 (padding) included.
        max_num_tiles: tiles ``T`` per image.
        tokens_per_tile: ``t``, class token included.
        embed_dim: ``d``.
    """

    def __init__(
        self, *, num_aspect_ratios: int, max_num_tiles: int, tokens_per_tile: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(tokens_per_tile, embed_dim) * embed_dim**-0.5)
        self.tile_embedding = nn.Embedding(
            num_aspect_ratios, max_num_tiles * tokens_per_tile * embed_dim
        )
        self.gate = TanhGate()

    def forward(self, x: Tensor, aspect_ratio_ids: Tensor) -> Tensor:
        """``x [m, T, t, d]``, ``aspect_ratio_ids [m]`` -> ``[m, T, t, d]``."""
        blend = self.gate.scale.tanh()
        x = x + (1 - blend) * self.embedding
        return x + blend * self.tile_embedding(aspect_ratio_ids).view(x.shape)


def _tile_attention_mask(aspect_ratio_mask: Tensor, *, tokens: int, padded: int) -> Tensor:
    """Bool ``[m, 1, T * padded, T * padded]`` from ``aspect_ratio_mask [m, T]``.

    A token is real when its tile is and it is not sequence padding. Only a pair of two padding
    tokens is masked: real tokens see everything, padding sees the real tokens. This is the
    mask the checkpoints were trained with, and no row is ever empty.
    """
    m = aspect_ratio_mask.shape[0]
    in_tile = torch.arange(padded, device=aspect_ratio_mask.device) < tokens
    real = (aspect_ratio_mask.bool()[:, :, None] & in_tile).reshape(m, -1)
    return (real[:, :, None] | real[:, None, :]).unsqueeze(1)


class TiledVisionTransformer(nn.Module):
    """Llama 3.2 Vision's image encoder, with its projection head.

    An image arrives as up to ``T`` tiles plus an aspect-ratio id (which tile layout, 0 for a
    padding image) and a tile mask. Each tile is a ViT sequence (patches + class token) with
    gated tile and position embeddings; the tiles of an image, padded to a multiple of 8
    tokens, are attended jointly by the local layers, then (after gated tile embeddings
    again) by the gated global layers. The output per token is the global layers' state
    concatenated with the local layers' states at ``hidden_layers`` (interleaved feature-wise
    as ``[d, len(hidden_layers)]``), then projected.

    Args:
        patch_embedding: tiles to patch vectors.
        layers: the local layers.
        global_layers: the gated global layers.
        projection: ``[..., d * (1 + len(hidden_layers))] -> [..., d_out]``.
        hidden_layers: indices of local layers whose outputs join the final state.
        max_num_tiles: ``T``.
        num_aspect_ratios: aspect-ratio ids, 0 (padding) included.
        pre_norm, post_norm: before the local layers and after them.
    """

    def __init__(
        self,
        *,
        patch_embedding: PatchEmbedding,
        layers: Sequence[nn.Module],
        global_layers: Sequence[nn.Module],
        projection: nn.Module,
        hidden_layers: Sequence[int],
        max_num_tiles: int,
        num_aspect_ratios: int,
        pre_norm: nn.Module,
        post_norm: nn.Module,
    ) -> None:
        super().__init__()
        _check_hidden_layers(hidden_layers, len(layers))
        d = patch_embedding.embed_dim
        tiles = {"num_aspect_ratios": num_aspect_ratios, "max_num_tiles": max_num_tiles}
        self.max_num_tiles = max_num_tiles
        self.hidden_layers = list(hidden_layers)
        self.patch_embedding = patch_embedding
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.pre_tile_embedding = TileEmbedding(**tiles, embed_dim=d)
        self.position_embedding = TilePositionEmbedding(
            **tiles, tokens_per_tile=self.tokens_per_tile, embed_dim=d
        )
        self.post_tile_embedding = TileEmbedding(**tiles, embed_dim=d)
        self.pre_norm = pre_norm
        self.layers = nn.ModuleList(layers)
        self.post_norm = post_norm
        self.global_layers = nn.ModuleList(global_layers)
        self.projection = projection

    @property
    def tokens_per_tile(self) -> int:
        return self.patch_embedding.num_patches + 1

    def forward(
        self, images: Tensor, *, aspect_ratio_ids: Tensor, aspect_ratio_mask: Tensor
    ) -> Tensor:
        """Encode tiled images.

        Args:
            images: ``[b, n_images, T, c, h, w]`` (padding images and tiles are zeros).
            aspect_ratio_ids: ``[b, n_images]``.
            aspect_ratio_mask: ``[b, n_images, T]``, 1 for real tiles.

        Returns:
            ``[b, n_images * T * tokens_per_tile, d_out]``, image-major then tile then token.

        Raises:
            ValueError: inputs of the wrong shape, an image of the wrong size or channels.
        """
        if images.dim() != 6 or images.shape[2] != self.max_num_tiles:
            raise InvalidInputError(
                f"images must be [b, n_images, {self.max_num_tiles} tiles, c, h, w], "
                f"got shape {tuple(images.shape)}"
            )
        b, n, tiles = images.shape[:3]
        if aspect_ratio_ids.shape != (b, n) or aspect_ratio_mask.shape != (b, n, tiles):
            raise InvalidInputError(
                f"aspect_ratio_ids must be [b, n_images] = [{b}, {n}] and aspect_ratio_mask "
                f"[b, n_images, T] = [{b}, {n}, {tiles}]; got {tuple(aspect_ratio_ids.shape)} "
                f"and {tuple(aspect_ratio_mask.shape)}"
            )
        m, t = b * n, self.tokens_per_tile
        ids = aspect_ratio_ids.reshape(m)
        x = self.pre_tile_embedding(self.patch_embedding(images).flatten(0, 1), ids)
        x = _prepend_class_token(self.class_embedding, x.flatten(0, 1)).view(m, tiles, t, -1)
        x = self.pre_norm(self.position_embedding(x, ids))

        # The checkpoints were trained on tiles padded to a multiple of 8 tokens.
        padded = t + (-t % 8)
        x = F.pad(x, (0, 0, 0, padded - t)).view(m, tiles * padded, -1)
        mask = _tile_attention_mask(aspect_ratio_mask.reshape(m, tiles), tokens=t, padded=padded)
        x, hidden = _run_layers(self.layers, x, mask=mask, keep=self.hidden_layers)
        x = self.post_norm(x).view(m, tiles, padded, -1)
        x = self.post_tile_embedding(x, ids).view(m, tiles * padded, -1)
        x, _ = _run_layers(self.global_layers, x, mask=mask, keep=())

        x = x.view(m, tiles, padded, -1)
        if hidden:
            x = torch.cat([x, torch.stack(hidden, dim=-1).view(m, tiles, padded, -1)], dim=-1)
        return self.projection(x[:, :, :t]).reshape(b, n * tiles * t, -1)


__all__ = [
    "PatchEmbedding",
    "TileEmbedding",
    "TilePositionEmbedding",
    "TiledVisionTransformer",
    "VisionTransformer",
    "vision_layer",
    "vision_transformer",
]
