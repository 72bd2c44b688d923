"""Generation with images on a tiny Llama 3.2 Vision: equal to transformers' generate, image
tiles and cross-attention masks equal to transformers' processor, image tokens checked."""

from __future__ import annotations

import pytest
import torch

import fusionlm
from fusionlm.images import to_pil
from fusionlm.models.mllama import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    mllama_cross_attention_mask,
    mllama_image_inputs,
)
from tests.helpers import CONFIGS, IMAGE, make_hf_mllama

# Rows: text then one image; an image first then text then a second image; no image.
PROMPTS = [[5, 6, 7, IMAGE, 8, 9], [IMAGE, 11, 12, 13, 14, IMAGE, 15, 16, 17], [20, 21, 22, 23]]


def image(height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


# Tiles are 16 x 16, at most 2 per image: a square image, a wide one (1 x 2 tiles), a tall one.
IMAGES = [[image(16, 16, 0)], [image(20, 40, 1), image(30, 12, 2)], []]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # make_hf_mllama seeds its weights with the name's length; this one's greedy outputs vary.
    directory = tmp_path_factory.mktemp("mllama_")
    reference = make_hf_mllama(directory, CONFIGS["gqa-2tiles"])
    return fusionlm.load_model(directory), reference


def reference_generate(reference, config, prompts, images, max_new_tokens: int):
    """transformers' greedy generate on left-padded prompts, fed our processed images."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, longest - len(prompt) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    prepared = mllama_image_inputs(config, prompts, images)
    if prepared is not None:
        encoder_input, _ = prepared
        tiles = encoder_input["aspect_ratio_mask"]
        num_tiles = [
            [int(tiles[i, k].sum()) for k in range(len(row))] for i, row in enumerate(images)
        ]
        inputs |= {
            "pixel_values": encoder_input["images"],
            "aspect_ratio_ids": encoder_input["aspect_ratio_ids"],
            "aspect_ratio_mask": encoder_input["aspect_ratio_mask"],
            "cross_attention_mask": mllama_cross_attention_mask(
                prompts,
                image_token_id=config.image_token_index,
                num_tiles=num_tiles,
                max_num_tiles=config.vision.max_num_tiles,
            ),
        }
    with torch.no_grad():
        out = reference.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, longest:].tolist()


def test_greedy_generation_with_images_equals_transformers(pair, monkeypatch):
    """Prompts run 4 tokens at a time: later chunks read the images from the cross-attention
    caches."""
    monkeypatch.setattr(fusionlm.generation, "PREFILL_CHUNK", 4)
    model, reference = pair
    batched = fusionlm.generate(model, PROMPTS, images=IMAGES, max_new_tokens=12)
    assert batched == reference_generate(reference, model.config, PROMPTS, IMAGES, 12)
    for prompt, images in zip(PROMPTS, IMAGES, strict=True):
        alone = fusionlm.generate(model, [prompt], images=[images], max_new_tokens=12)
        assert alone == reference_generate(reference, model.config, [prompt], [images], 12)
    assert len({tuple(row) for row in batched}) == 3 and all(len(set(r)) > 2 for r in batched)


def test_a_batch_equals_each_prompt_alone_when_prompts_open_with_an_image(pair):
    """Text before a prompt's first image (and a prompt without images) attends to every
    image of the batch in transformers' Mllama, which we reproduce (see
    ``TransformerCrossAttentionLayer``'s ``empty_rows``); prompts that open with their image
    do not depend on the rest of the batch."""
    model, _ = pair
    prompts = [[IMAGE, 5, 6, 7], [IMAGE, IMAGE, 8, 9, 10, 11, 12], [IMAGE, 13, 14, IMAGE, 15]]
    images = [[image(16, 16, 3)], [image(16, 40, 4), image(40, 40, 5)], [image(9, 9, 6)] * 2]
    batched = fusionlm.generate(model, prompts, images=images, max_new_tokens=10)
    alone = [
        fusionlm.generate(model, [p], images=[i], max_new_tokens=10)[0]
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == alone


def test_image_tiles_equal_transformers_processor(pair):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    model, _ = pair
    processor = MllamaImageProcessorPil(
        size={"height": 16, "width": 16},
        max_image_tiles=2,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    sizes = [[(16, 16), (20, 40)], [(30, 12)], [(7, 9), (50, 50)], [(16, 33)]]
    images = [
        [image(h, w, 10 * i + k) for k, (h, w) in enumerate(row)] for i, row in enumerate(sizes)
    ]
    expected = processor([[to_pil(im) for im in row] for row in images], return_tensors="pt")
    prompts = [[IMAGE] * len(row) + [5] for row in images]
    encoder_input, _ = mllama_image_inputs(model.config, prompts, images)
    torch.testing.assert_close(encoder_input["images"], expected["pixel_values"], atol=0, rtol=0)
    assert torch.equal(encoder_input["aspect_ratio_ids"], expected["aspect_ratio_ids"])
    assert torch.equal(encoder_input["aspect_ratio_mask"], expected["aspect_ratio_mask"])


def test_cross_attention_mask_equals_transformers_processor():
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    prompts = [
        [1, 2, IMAGE, 3, 4],
        [IMAGE, 5, IMAGE, 6, 7, 8, 9],
        [IMAGE, IMAGE, 5, 6, IMAGE, 7],
        [8, IMAGE, IMAGE],
        [1, 2, 3],
    ]
    num_tiles = [[2], [1, 2], [2, 1, 1], [1, 2], []]
    longest = max(len(p) for p in prompts)
    padded = [[0] * (longest - len(p)) + p for p in prompts]
    expected = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(ids, IMAGE) for ids in padded],
        num_tiles=num_tiles,
        max_num_tiles=2,
        length=longest,
    )
    actual = mllama_cross_attention_mask(
        prompts, image_token_id=IMAGE, num_tiles=num_tiles, max_num_tiles=2
    )
    assert torch.equal(actual, torch.from_numpy(expected))


def test_image_tokens_must_match_the_images(pair):
    model, _ = pair
    with pytest.raises(ValueError, match=r"prompt 0 has 1 <\|image\|> token\(s\) .* but 2 image"):
        fusionlm.generate(model, [PROMPTS[0]], images=[[image(8, 8, 0)] * 2], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt 1 has 0 <\|image\|> token\(s\)"):
        fusionlm.generate(model, [[5, 6], [7, 8]], images=[[], [image(8, 8, 0)]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"but 0 image\(s\)"):
        fusionlm.generate(model, [PROMPTS[0]], images=[[]], max_new_tokens=2)


def test_text_only_generation_equals_transformers(pair):
    model, reference = pair
    prompts = [[5, 6, 7, 8], [9, 10]]
    expected = reference_generate(reference, model.config, prompts, [[], []], 8)
    assert fusionlm.generate(model, prompts, max_new_tokens=8) == expected
