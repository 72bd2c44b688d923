"""Generic deep fusion: a pretrained decoder given gated cross-attention layers, and the
encoder inputs of a batch of prompts with images, for any vision model fusionlm builds.

The usual recipe, as in ``examples/fusion_captioning.py``::

    decoder = fuse_decoder(fusionlm.load_model(), every_n_layers=6)
    encoder = vision_transformer(image_size=32, patch_size=8, ..., out_dim=576)
    model = DeepFusionModel(decoder, encoder, encoder_trainable=True)
    ... train ...
    fusionlm.generate(model, prompts, images=[[image], ...])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.images import ImageLike, to_tensor
from fusionlm.models.cross_attention import gated_cross_attention_layer
from fusionlm.models.mllama import MllamaConfig, mllama_image_inputs
from fusionlm.models.vision import VisionTransformer
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.feed_forward import FeedForward
from fusionlm.modules.fusion import DeepFusionModel, FusionLayer
from fusionlm.modules.layers import TransformerCrossAttentionLayer


def cross_attention_layer(
    *,
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    encoder_dim: int,
    intermediate_size: int,
    norm_eps: float = 1e-5,
    attn_backend: str = "sdpa",
) -> TransformerCrossAttentionLayer:
    """A fresh gated cross-attention layer (Llama 3.2 Vision's design): RMSNorm, attention
    with RMS-normed queries and keys reading the encoder output, a SwiGLU MLP, ``TanhGate`` on
    both branches (zero at first, so the layer starts as the identity). A text token that sees
    no encoder position is left unchanged (``empty_rows="skip"``).

    Args:
        embed_dim: the decoder's width ``d``.
        num_heads, num_kv_heads, head_dim: the attention's heads.
        encoder_dim: the width of the encoder output it reads.
        intermediate_size: the MLP's hidden width.
    """
    mlp = FeedForward(
        gate_proj=nn.Linear(embed_dim, intermediate_size, bias=False),
        down_proj=nn.Linear(intermediate_size, embed_dim, bias=False),
        up_proj=nn.Linear(embed_dim, intermediate_size, bias=False),
    )
    return gated_cross_attention_layer(
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        encoder_dim=encoder_dim,
        mlp=mlp,
        norm_eps=norm_eps,
        attn_backend=attn_backend,
    )


def fuse_decoder(
    decoder: TransformerDecoder,
    *,
    every_n_layers: int,
    encoder_dim: int | None = None,
    intermediate_size: int | None = None,
    norm_eps: float = 1e-5,
    attn_backend: str = "sdpa",
) -> TransformerDecoder:
    """``decoder`` with a fresh cross-attention layer fused into every ``every_n_layers``-th layer.

    Layers ``every_n_layers - 1, 2 * every_n_layers - 1, ...`` become ``FusionLayer``\\ s whose
    cross-attention (``cross_attention_layer``, a fusion module) runs first. The result shares
    ``decoder``'s modules, so ``decoder``'s state dict loads strictly into it once the fusion
    keys (``layers.N.fusion_layer.*``) are allowed for, and with its fresh gates it computes
    exactly what ``decoder`` does. The new layers take the dtype and device of ``decoder``.

    Args:
        decoder: a pretrained decoder (its self-attention layers have an ``attn``).
        every_n_layers: the spacing of the fusion layers, from 1 (every layer) to the number
            of layers (only the last).
        encoder_dim: the width of the encoder output (default: the decoder's width).
        intermediate_size: the fusion MLPs' hidden width (default: 4 x the decoder's width).
        norm_eps: the fusion layers' RMSNorm epsilon.
        attn_backend: the fusion layers' attention backend.

    Raises:
        ValueError: ``every_n_layers`` out of range, or a decoder that is already fused.
    """
    layers = list(decoder.layers)
    if not 1 <= every_n_layers <= len(layers):
        raise InvalidInputError(
            f"every_n_layers must be in [1, {len(layers)}], got {every_n_layers}"
        )
    if any(isinstance(layer, FusionLayer) for layer in layers):
        raise InvalidInputError("this decoder already has fusion layers")
    d = decoder.tok_embeddings.embedding_dim
    attn = layers[0].attn
    reference = decoder.tok_embeddings.weight
    for i in range(every_n_layers - 1, len(layers), every_n_layers):
        fusion = cross_attention_layer(
            embed_dim=d,
            num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            encoder_dim=encoder_dim if encoder_dim is not None else d,
            intermediate_size=intermediate_size if intermediate_size is not None else 4 * d,
            norm_eps=norm_eps,
            attn_backend=attn_backend,
        ).to(device=reference.device, dtype=reference.dtype)
        layers[i] = FusionLayer(layers[i], fusion)
    fused = TransformerDecoder(
        tok_embeddings=decoder.tok_embeddings,
        layers=layers,
        max_seq_len=decoder.max_seq_len,
        num_heads=decoder.num_heads,
        head_dim=decoder.head_dim,
        norm=decoder.norm,
        output=decoder.output,
        output_hidden_states=decoder.output_hidden_states,
    )
    fused.num_output_chunks = decoder.num_output_chunks
    fused.skip_output_layer = decoder.skip_output_layer
    return fused


# -- images -> encoder inputs ---------------------------------------------------------------


def vit_image_inputs(
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[ImageLike]],
    *,
    tokens_per_image: int,
) -> tuple[dict[str, Tensor], Tensor] | None:
    """Encoder input and mask for a ``VisionTransformer``: every token of a prompt sees all of
    its images (no image tokens needed). Images are used as they are, values in ``[0, 1]``,
    and padded per batch to the most any prompt has; a prompt without images sees none.

    Returns:
        ``({"images": [b, n_images, c, h, w]}, encoder_mask)`` with ``encoder_mask`` bool
        ``[b, longest, n_images * tokens_per_image]`` for the left-padded prompts; None when
        no prompt has an image.

    Raises:
        TypeError, ValueError: not images (see ``fusionlm.images.to_tensor``), or images of
            different shapes (the encoder checks that they have its size and channels).
    """
    tensors = [[to_tensor(image) for image in row] for row in images]
    n_images = max((len(row) for row in tensors), default=0)
    if n_images == 0:
        return None
    shapes = sorted({tuple(t.shape) for row in tensors for t in row})
    if len(shapes) > 1:
        raise InvalidInputError(
            f"the images of a batch must share one shape [c, h, w], got {shapes}"
        )
    b, longest = len(prompts), max(len(prompt) for prompt in prompts)
    pixels = torch.zeros(b, n_images, *shapes[0])
    mask = torch.zeros(b, longest, n_images, tokens_per_image, dtype=torch.bool)
    for i, (prompt, row) in enumerate(zip(prompts, tensors, strict=True)):
        for k, image in enumerate(row):
            pixels[i, k] = image
        mask[i, longest - len(prompt) :, : len(row)] = True
    return {"images": pixels}, mask.flatten(2)


def image_inputs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[ImageLike]],
) -> tuple[dict[str, Tensor], Tensor] | None:
    """The encoder input and mask of ``model`` for prompts and their images, for generation.

    Dispatches on the model: a Llama 3.2 Vision model (``mllama_image_inputs``: tiles, and a
    mask from the prompts' ``<|image|>`` tokens), or a ``DeepFusionModel`` over a
    ``VisionTransformer`` or another encoder of ``images [b, n, c, h, w]`` with an int
    ``tokens_per_image`` attribute (``vit_image_inputs``).

    Args:
        model: the model to generate with.
        prompts: token ids per prompt.
        images: one list of images per prompt (empty for a prompt without).

    Returns:
        ``(encoder_input, encoder_mask)``, the mask ``[b, longest prompt, s_e]`` for the
        left-padded prompts; None when no prompt has an image.

    Raises:
        ValueError: not one list of images per prompt; images for a model that reads none;
            the model-specific errors above.
    """
    if len(images) != len(prompts) or not all(isinstance(row, list | tuple) for row in images):
        raise InvalidInputError(
            f"images must hold one list of images per prompt ({len(prompts)} prompts), "
            "an empty list for a prompt without"
        )
    if not isinstance(model, DeepFusionModel):
        if not any(images):
            return None
        raise InvalidInputError(
            f"images were given, but this model ({type(model).__name__}) is text-only: it has "
            "no vision encoder to read them"
        )
    if isinstance(model.config, MllamaConfig):
        return mllama_image_inputs(model.config, prompts, images)
    # A VisionTransformer, or any encoder called as encoder(images=[b, n, c, h, w]) that says
    # how many tokens it makes of an image.
    tokens_per_image = getattr(model.encoder, "tokens_per_image", None)
    if isinstance(model.encoder, VisionTransformer) or isinstance(tokens_per_image, int):
        return vit_image_inputs(prompts, images, tokens_per_image=tokens_per_image)
    raise InvalidInputError(
        f"fusionlm does not know how to prepare images for a {type(model.encoder).__name__} "
        "encoder; pass encoder_input and encoder_mask to generate_tokens yourself"
    )


__all__ = [
    "cross_attention_layer",
    "fuse_decoder",
    "image_inputs",
    "vit_image_inputs",
]
