"""fuse_decoder and generation with images through a ViT fusion model: the builder keeps the
decoder's keys and outputs, the cache path equals full forwards, batches equal each prompt
alone, bad input is refused."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fusionlm
from fusionlm import llama
from fusionlm.generation import SamplingParams, generate_tokens
from fusionlm.models.fusion import fuse_decoder, image_inputs, vit_image_inputs
from fusionlm.modules.fusion import DeepFusionModel, FusionLayer, get_fusion_params
from fusionlm.modules.layers import TanhGate
from tests import helpers
from tests.helpers import randomize_

VOCAB, DIM, SIZE = helpers.VOCAB, helpers.DIM, 16
CONFIG = dataclasses.replace(helpers.CONFIG, num_hidden_layers=4)
TOKENS_PER_IMAGE = helpers.TOKENS_PER_IMAGE


def plain_decoder() -> fusionlm.TransformerDecoder:
    return helpers.plain_decoder(num_hidden_layers=CONFIG.num_hidden_layers)


def encoder() -> torch.nn.Module:
    return helpers.encoder(hidden_layers=())


@pytest.fixture(scope="module")
def trained() -> DeepFusionModel:
    """A fusion model whose fusion layers and encoder have random (open) weights."""
    model = DeepFusionModel(fuse_decoder(plain_decoder(), every_n_layers=2), encoder())
    for module in model.modules():
        if isinstance(module, FusionLayer):
            randomize_(module.fusion_layer, seed=2)
    randomize_(model.encoder, seed=3)
    return model.eval()


def image(seed: int, *, channels: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.rand(channels, size, size, generator=torch.Generator().manual_seed(seed))


PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32]]
IMAGES = [[image(0)], [image(1), image(2)], [], [image(3)]]


# -- the builder ------------------------------------------------------------------------------


def test_fusion_layers_sit_every_n_layers_and_keep_the_decoder_keys():
    plain = plain_decoder()
    fused = fuse_decoder(llama(CONFIG), every_n_layers=2)
    assert [isinstance(layer, FusionLayer) for layer in fused.layers] == [False, True] * 2
    assert all(
        isinstance(layer, FusionLayer)
        for layer in fuse_decoder(llama(CONFIG), every_n_layers=1).layers
    )
    fusion_keys = set(get_fusion_params(fused))
    assert fusion_keys and all(".fusion_layer." in key for key in fusion_keys)
    assert set(fused.state_dict()) == set(plain.state_dict()) | fusion_keys
    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == fusion_keys
    gates = [m for m in fused.modules() if isinstance(m, TanhGate)]
    assert len(gates) == 4 and all(not g.scale.any() for g in gates)


def test_a_fresh_fusion_leaves_the_decoder_unchanged():
    plain = plain_decoder()
    model = DeepFusionModel(fuse_decoder(plain, every_n_layers=2), encoder()).eval()
    tokens = torch.randint(0, VOCAB, (2, 9))
    images = torch.rand(2, 2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = plain(tokens)
        torch.testing.assert_close(
            model(tokens, encoder_input={"images": images}), expected, atol=0, rtol=0
        )


def test_defaults_train_only_the_fusion_params_and_flags_add_the_encoder():
    model = DeepFusionModel(fuse_decoder(plain_decoder(), every_n_layers=2), encoder())
    fusion = set(get_fusion_params(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == fusion
    assert "encoder.projection.weight" in fusion
    model = DeepFusionModel(
        fuse_decoder(plain_decoder(), every_n_layers=2), encoder(), encoder_trainable=True
    )
    encoder_params = {f"encoder.{n}" for n, _ in model.encoder.named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == fusion | encoder_params


def test_the_builder_refuses_nonsense():
    for every in (0, 5):
        with pytest.raises(ValueError, match=r"every_n_layers must be in \[1, 4\]"):
            fuse_decoder(llama(CONFIG), every_n_layers=every)
    with pytest.raises(ValueError, match="already has fusion layers"):
        fuse_decoder(fuse_decoder(llama(CONFIG), every_n_layers=2), every_n_layers=2)


def test_a_different_encoder_width_and_dtype_are_followed():
    decoder = llama(CONFIG).to(torch.bfloat16)
    fused = fuse_decoder(decoder, every_n_layers=4, encoder_dim=48, intermediate_size=32)
    cross = fused.layers[3].fusion_layer
    assert cross.attn.k_proj.weight.shape == (2 * 16, 48)
    assert cross.mlp.w1.weight.shape == (32, DIM)
    assert all(p.dtype == torch.bfloat16 for p in fused.parameters())


# -- generation with images ---------------------------------------------------------------------


def full_forward_greedy(model, prompt, images, steps: int) -> list[int]:
    """The reference: argmax over full forward passes without caches, every token seeing the
    prompt's images."""
    tokens = list(prompt)
    encoder_input = {"images": torch.stack(images)[None]} if images else None
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), encoder_input=encoder_input)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_generation_with_images_equals_full_forwards_and_encodes_once(trained):
    calls = []
    hook = trained.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        batched = fusionlm.generate(trained, PROMPTS, images=IMAGES, max_new_tokens=8)
    finally:
        hook.remove()
    assert len(calls) == 1, "the encoder runs once, at the prefill"
    for prompt, images, new in zip(PROMPTS, IMAGES, batched, strict=True):
        assert new == full_forward_greedy(trained, prompt, images, 8)


def test_a_batch_equals_each_prompt_alone(trained):
    batched = fusionlm.generate(trained, PROMPTS, images=IMAGES, max_new_tokens=10)
    alone = [
        fusionlm.generate(trained, [p], images=[i], max_new_tokens=10)[0]
        for p, i in zip(PROMPTS, IMAGES, strict=True)
    ]
    assert batched == alone
    other = fusionlm.generate(
        trained, PROMPTS, images=[[image(9 + len(i))] * len(i) for i in IMAGES], max_new_tokens=10
    )
    assert other[2] == batched[2], "a prompt without images is text only"
    assert other != batched, "the images matter"


def test_text_only_generation_of_a_fusion_model_is_the_decoders(trained):
    plain = trained.decoder
    expected = fusionlm.generate(plain, PROMPTS, max_new_tokens=6)
    assert fusionlm.generate(trained, PROMPTS, max_new_tokens=6) == expected
    assert fusionlm.generate(trained, PROMPTS, images=[[]] * 4, max_new_tokens=6) == expected
    assert not trained.caches_are_setup()


def test_vit_inputs_mask_padding_and_missing_images():
    encoder_input, mask = vit_image_inputs(PROMPTS, IMAGES, tokens_per_image=TOKENS_PER_IMAGE)
    assert encoder_input["images"].shape == (4, 2, 3, SIZE, SIZE)
    assert mask.shape == (4, 7, 2 * TOKENS_PER_IMAGE) and mask.dtype == torch.bool
    t = TOKENS_PER_IMAGE
    assert not mask[0, :3].any() and mask[0, 3:, :t].all() and not mask[0, :, t:].any()
    assert mask[1].all()
    assert not mask[2].any() and not encoder_input["images"][2].any()
    assert vit_image_inputs(PROMPTS, [[]] * 4, tokens_per_image=t) is None


def test_bad_images_are_refused(trained):
    generate = functools.partial(fusionlm.generate, max_new_tokens=4)
    with pytest.raises(ValueError, match="text-only"):
        generate(plain_decoder(), [[1, 2]], images=[[image(0)]])
    with pytest.raises(ValueError, match=r"one list of images per prompt \(2 prompts\)"):
        generate(trained, [[1, 2], [3]], images=[[image(0)]])
    with pytest.raises(ValueError, match="one list of images per prompt"):
        generate(trained, [[1, 2]], images=[image(0)])
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 3, 20, 20\)"):
        generate(trained, [[1, 2]], images=[[image(0, size=20)]])
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 1, 16, 16\)"):
        generate(trained, [[1, 2]], images=[[image(0, channels=1)]])
    with pytest.raises(ValueError, match="must share one shape"):
        generate(trained, [[1, 2], [3]], images=[[image(0)], [image(1, size=20)]])
    with pytest.raises(TypeError, match="Pillow image or a tensor"):
        generate(trained, [[1, 2]], images=[["cat.png"]])
    assert not trained.caches_are_setup()


def test_generate_tokens_checks_the_encoder_mask(trained):
    encoder_input, mask = image_inputs(trained, PROMPTS, IMAGES)
    run = SamplingParams()

    def first_step(**encoder):
        return next(generate_tokens(trained, PROMPTS, max_new_tokens=1, sampling=run, **encoder))

    with pytest.raises(ValueError, match="go together"):
        first_step(encoder_input=encoder_input)
    with pytest.raises(ValueError, match=r"\[b, longest prompt, s_e\] = \[4, 7, s_e\]"):
        first_step(encoder_input=encoder_input, encoder_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="does not fit"):
        first_step(encoder_input=encoder_input, encoder_mask=mask[:, :, 1:])
    assert first_step(encoder_input=encoder_input, encoder_mask=mask) == [
        new[0] for new in fusionlm.generate(trained, PROMPTS, images=IMAGES, max_new_tokens=1)
    ]
