"""fusionlm's Llama 3.2 Vision equals transformers' MllamaForConditionalGeneration."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import fusionlm
from fusionlm.checkpoint.mllama import MllamaKeyTable
from fusionlm.loading import load_model
from fusionlm.models.mllama import MllamaConfig, llama3_2_vision, mllama_encoder_mask
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.fusion import DeepFusionModel, FusionLayer
from tests.helpers import CONFIGS, IMAGE, VOCAB, make_hf_mllama


@dataclasses.dataclass
class Checkpoint:
    directory: Path
    reference: Any
    inputs: dict[str, torch.Tensor]
    expected: torch.Tensor  # the reference's logits for inputs


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory) -> Checkpoint:
    directory = tmp_path_factory.mktemp(request.param)
    reference = make_hf_mllama(directory, CONFIGS[request.param])
    inputs = batch(reference)
    other_images = {**inputs, "pixel_values": torch.randn_like(inputs["pixel_values"])}
    with torch.no_grad():
        expected = reference(**inputs).logits
        elsewhere = reference(**other_images).logits
    assert expected.abs().max() > 1.0, "reference logits too small for a meaningful comparison"
    assert (elsewhere - expected)[:2].abs().max() > 0.1, "the images must matter to the logits"
    return Checkpoint(directory, reference, inputs, expected)


def batch(reference, *, s: int = 12) -> dict[str, torch.Tensor]:
    """Row 0: one image (all tiles) after 3 text tokens; row 1: two images, one tile then all
    tiles, the first token before any; row 2: no image. Text before and after the images."""
    vision = reference.config.vision_config
    tiles, size = vision.max_num_tiles, vision.image_size
    ratios = [tuple(r) for r in vision.supported_aspect_ratios]
    full = ratios.index((1, tiles)) + 1  # aspect-ratio ids count from 1; 0 is padding
    tokens = torch.randint(3, VOCAB, (3, s))
    tokens[0, 3] = tokens[1, 1] = tokens[1, 6] = IMAGE
    aspect_ratio_ids = torch.tensor([[full, 0], [1, full], [0, 0]])
    aspect_ratio_mask = torch.zeros(3, 2, tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1  # the processor marks tile 0 of padding images too
    aspect_ratio_mask[0, 0] = aspect_ratio_mask[1, 1] = 1
    pixel_values = (
        torch.randn(3, 2, tiles, 3, size, size) * aspect_ratio_mask[..., None, None, None]
    )
    pixel_values[2] = 0
    cross_attention_mask = torch.zeros(3, s, 2, tiles, dtype=torch.long)
    cross_attention_mask[0, 3:, 0] = 1
    cross_attention_mask[1, 1:, 0, :1] = 1
    cross_attention_mask[1, 6:, 1] = 1
    return {
        "input_ids": tokens,
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "cross_attention_mask": cross_attention_mask,
    }


def our_inputs(inputs: dict[str, torch.Tensor], config: MllamaConfig) -> dict[str, Any]:
    return {
        "encoder_input": {
            "images": inputs["pixel_values"],
            "aspect_ratio_ids": inputs["aspect_ratio_ids"],
            "aspect_ratio_mask": inputs["aspect_ratio_mask"],
        },
        "encoder_mask": mllama_encoder_mask(
            inputs["cross_attention_mask"], tokens_per_tile=config.vision.tokens_per_tile
        ),
    }


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_match_transformers(checkpoint, backend):
    model = load_model(checkpoint.directory, attn_backend=backend)
    inputs = checkpoint.inputs
    with torch.no_grad():
        actual = model(inputs["input_ids"], **our_inputs(inputs, model.config))
    torch.testing.assert_close(actual, checkpoint.expected, atol=1e-4, rtol=0)


def test_text_only_matches_transformers(checkpoint):
    model = fusionlm.load_model(
        checkpoint.directory
    )  # the public entry point dispatches on model_type
    assert isinstance(model, DeepFusionModel)
    tokens = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = checkpoint.reference(input_ids=tokens).logits
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


def test_incremental_decoding_equals_full_forward(checkpoint):
    model = load_model(checkpoint.directory, attn_backend="sdpa")
    ours = our_inputs(checkpoint.inputs, model.config)
    tokens, encoder_mask = checkpoint.inputs["input_ids"], ours["encoder_mask"]
    s, prefill = tokens.shape[1], 9  # the prefill holds every image token
    encoder_calls, cross_kv_calls = [], []
    model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    for layer in model.decoder.layers:
        if isinstance(layer, FusionLayer):
            layer.fusion_layer.attn.k_proj.register_forward_hook(
                lambda *_: cross_kv_calls.append(1)
            )
    with torch.no_grad():
        full = model(tokens, **ours)
        encoder_calls.clear()
        cross_kv_calls.clear()
        model.setup_caches(
            3, torch.float32, encoder_max_seq_len=encoder_mask.shape[-1], decoder_max_seq_len=16
        )
        steps = [
            model(
                tokens[:, :prefill],
                encoder_input=ours["encoder_input"],
                encoder_mask=encoder_mask[:, :prefill],
                input_pos=torch.arange(prefill),
            )
        ]
        for i in range(prefill, s):
            step = model(
                tokens[:, i : i + 1],
                encoder_mask=encoder_mask[:, i : i + 1],
                input_pos=torch.tensor([i]),
            )
            steps.append(step)
    decoded = torch.cat(steps, dim=1)
    assert len(encoder_calls) == 1, "the images are encoded once, at prefill"
    assert len(cross_kv_calls) == len(model.config.cross_attention_layers), "cross K/V once"
    model.remove_caches()
    assert not model.caches_are_setup()
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, checkpoint.expected, atol=1e-4, rtol=0)


def test_key_table_and_layer_numbering_round_trip(checkpoint):
    directory = checkpoint.directory
    model = load_model(directory, attn_backend="sdpa")
    config: MllamaConfig = model.config
    table = MllamaKeyTable(config)
    ours = set(model.state_dict())
    with safe_open(directory / "model.safetensors", framework="pt") as f:
        theirs = set(f.keys())

    # The fusion rows are stored as the last rows of embed_tokens, not under a name.
    named = ours - {"decoder.tok_embeddings.fusion_embedding.weight"}
    assert {table.to_theirs(key) for key in named} == theirs
    assert {table.to_ours(key) for key in theirs} == named
    for key in named:
        assert table.to_ours(table.to_theirs(key)) == key

    for hf_index in range(config.num_hidden_layers):
        index, fused = config.from_hf_layer(hf_index)
        assert config.to_hf_layer(index, fused=fused) == hf_index
        assert isinstance(model.decoder.layers[index], FusionLayer) or not fused
    assert sorted(config.fused_layers) == [
        i for i, layer in enumerate(model.decoder.layers) if isinstance(layer, FusionLayer)
    ]
    with pytest.raises(ValueError, match="no fused cross-attention layer at index"):
        config.to_hf_layer(next(i for i in range(9) if i not in config.fused_layers), fused=True)


@pytest.mark.parametrize(
    ("layers", "cross", "message"),
    [(5, [1, 4], r"\[4\] are not followed"), (5, [1, 2], r"\[1\] are not followed")],
)
def test_unsupported_layer_layouts_are_refused(layers, cross, message):
    text = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_attention_heads": 4}
    config = {"text_config": {**text, "num_hidden_layers": layers, "cross_attention_layers": cross}}
    with pytest.raises(ValueError, match=message):
        MllamaConfig.from_hf(config)


def test_bad_tiled_images_are_refused(checkpoint):
    model = load_model(checkpoint.directory, attn_backend="sdpa")
    inputs = checkpoint.inputs
    ours = our_inputs(inputs, model.config)
    images = inputs["pixel_values"]
    b, n, tiles, c, size, _ = images.shape
    bad = {
        rf"got shape \(3, 2, {tiles}, 3, {size + 4}, {size + 4}\)": torch.zeros(
            b, n, tiles, c, size + 4, size + 4
        ),
        rf"= \[\.\.\., 3, {size}, {size}\], got shape \(3, 2, {tiles}, 1,": torch.zeros(
            b, n, tiles, 1, size, size
        ),
        rf"images must be \[b, n_images, {tiles} tiles": images[:, :, :1],
    }
    for message, value in bad.items():
        with pytest.raises(ValueError, match=message):
            model(inputs["input_ids"], encoder_input={**ours["encoder_input"], "images": value})
    with pytest.raises(ValueError, match=r"aspect_ratio_ids must be \[b, n_images\]"):
        model(
            inputs["input_ids"],
            encoder_input={**ours["encoder_input"], "aspect_ratio_ids": torch.zeros(3, 1)},
        )


def test_freshly_built_model_ignores_images_until_trained():
    """init_weights=True gives real parameters, and zero gates leave the text decoder alone."""
    config = MllamaConfig.from_hf(
        {
            "text_config": {
                "vocab_size": 96,
                "hidden_size": 64,
                "intermediate_size": 112,
                "num_attention_heads": 4,
                "num_hidden_layers": 3,
                "cross_attention_layers": [0],
            },
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_global_layers": 1,
                "attention_heads": 4,
                "image_size": 8,
                "patch_size": 4,
                "max_num_tiles": 1,
                "supported_aspect_ratios": [[1, 1]],
                "intermediate_layers_indices": [0],
                "vision_output_dim": 64,
            },
            "image_token_index": 96,
        }
    )
    model = llama3_2_vision(config).eval()
    assert not any(p.is_meta for p in model.parameters())
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, MultiHeadAttention))
    tokens = torch.randint(0, 97, (1, 5))
    images = torch.randn(1, 1, 1, 3, 8, 8)
    encoder_input = {
        "images": images,
        "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.long),
        "aspect_ratio_mask": torch.ones(1, 1, 1, dtype=torch.long),
    }
    with torch.no_grad():
        fused = model(tokens, encoder_input=encoder_input)
        text_only = model(tokens)
    torch.testing.assert_close(fused, text_only, atol=0, rtol=0)
