"""Deep fusion: FusionLayer/FusionEmbedding keys, fresh gates, trainable flags, caches, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlm import disable_kv_cache, llama
from fusionlm.models.llama import llama_mlp
from fusionlm.modules.attention import MultiHeadAttention
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.fusion import (
    DeepFusionModel,
    FusionEmbedding,
    FusionLayer,
    get_fusion_params,
    set_trainable_params,
)
from fusionlm.modules.layers import TanhGate, TransformerCrossAttentionLayer
from fusionlm.modules.norm import RMSNorm
from tests.helpers import CONFIG, DIM, TOKENS_PER_IMAGE, VOCAB, encoder, plain_decoder, randomize_

FUSION_VOCAB = 4


def cross_layer(
    *, backend: str = "sdpa", empty_rows: str = "skip"
) -> TransformerCrossAttentionLayer:
    attn = MultiHeadAttention(
        embed_dim=DIM,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        q_proj=nn.Linear(DIM, 64, bias=False),
        k_proj=nn.Linear(DIM, 32, bias=False),
        v_proj=nn.Linear(DIM, 32, bias=False),
        output_proj=nn.Linear(64, DIM, bias=False),
        is_causal=False,
        backend=backend,
    )
    return TransformerCrossAttentionLayer(
        attn,
        llama_mlp(CONFIG),
        ca_norm=RMSNorm(DIM),
        mlp_norm=RMSNorm(DIM),
        ca_scale=TanhGate(),
        mlp_scale=TanhGate(),
        empty_rows=empty_rows,
    )


def fuse(decoder: TransformerDecoder, *, at: tuple[int, ...] = (1,)) -> TransformerDecoder:
    """``decoder``'s layers, those in ``at`` fused with a fresh cross-attention layer."""
    layers = [
        FusionLayer(layer, cross_layer()) if i in at else layer
        for i, layer in enumerate(decoder.layers)
    ]
    return TransformerDecoder(
        tok_embeddings=FusionEmbedding(VOCAB, FUSION_VOCAB, DIM),
        layers=layers,
        max_seq_len=decoder.max_seq_len,
        num_heads=4,
        head_dim=16,
        norm=decoder.norm,
        output=decoder.output,
    )


def fused_model(**flags: bool) -> DeepFusionModel:
    return DeepFusionModel(fuse(llama(CONFIG)), encoder(), **flags)


def inputs(b: int = 2, s: int = 6, n_images: int = 2) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Tokens, encoder input and an encoder mask in which row 0 sees no image."""
    tokens = torch.randint(0, VOCAB, (b, s))
    images = torch.randn(b, n_images, 3, 16, 16)
    mask = torch.rand(b, s, n_images * TOKENS_PER_IMAGE) < 0.5
    mask[:, 0] = False
    return tokens, {"images": images}, mask


# -- FusionLayer and FusionEmbedding keep the pretrained names ------------------------------


def test_plain_decoder_state_dict_loads_into_fused_decoder():
    plain = plain_decoder()
    fused = fuse(llama(CONFIG))
    fusion_keys = set(get_fusion_params(fused))
    assert set(fused.state_dict()) == set(plain.state_dict()) | fusion_keys
    assert "layers.1.attn.q_proj.weight" in fused.state_dict()
    assert "tok_embeddings.fusion_embedding.weight" in fusion_keys

    missing, unexpected = fused.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == fusion_keys
    for key, value in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    fused.load_state_dict(fused.state_dict(), strict=True)  # its own keys round-trip


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_fresh_gates_leave_the_decoder_unchanged(backend):
    plain = llama(CONFIG, attn_backend=backend)
    randomize_(plain)
    fused = fuse(llama(CONFIG, attn_backend=backend))
    fused.load_state_dict(plain.state_dict(), strict=False)
    model = DeepFusionModel(fused, encoder()).eval()
    tokens, encoder_input, encoder_mask = inputs()
    with torch.no_grad():
        expected = plain.eval()(tokens)
        actual = model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_fusion_layer_runs_fusion_first_or_last():
    layer, fusion = plain_decoder().layers[0], cross_layer()
    randomize_(fusion)
    x, y = torch.randn(1, 5, DIM), torch.randn(1, 7, DIM)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        first = FusionLayer(layer, fusion)(x, encoder_input=y, input_pos=pos)
        last = FusionLayer(layer, fusion, fusion_first=False)(x, encoder_input=y, input_pos=pos)
        expected_first = layer(fusion(x, encoder_input=y), input_pos=pos)
        expected_last = fusion(layer(x, input_pos=pos), encoder_input=y)
    torch.testing.assert_close(first, expected_first, atol=0, rtol=0)
    torch.testing.assert_close(last, expected_last, atol=0, rtol=0)


def test_fusion_embedding_equals_two_lookups_and_keeps_the_pretrained_key():
    embedding = FusionEmbedding(VOCAB, FUSION_VOCAB, DIM)
    tokens = torch.tensor([[0, 95, 96, 99, 5], [97, 1, 98, 2, 96]])
    table = torch.cat([embedding.embedding.weight, embedding.fusion_embedding.weight])
    torch.testing.assert_close(embedding(tokens), table[tokens], atol=0, rtol=0)
    assert embedding.num_embeddings == VOCAB + FUSION_VOCAB
    assert set(embedding.state_dict()) == {"weight", "fusion_embedding.weight"}

    pretrained = nn.Embedding(VOCAB, DIM)
    missing, unexpected = embedding.load_state_dict(pretrained.state_dict(), strict=False)
    assert missing == ["fusion_embedding.weight"] and unexpected == []
    assert torch.equal(embedding.weight, pretrained.weight)


def test_fusion_embedding_compiles_without_graph_breaks():
    embedding = FusionEmbedding(VOCAB, FUSION_VOCAB, DIM)
    compiled = torch.compile(embedding, fullgraph=True, backend="eager")
    for tokens in (torch.tensor([[3, 97, 50]]), torch.tensor([[96, 99], [0, 95]])):
        torch.testing.assert_close(compiled(tokens), embedding(tokens), atol=0, rtol=0)


# -- trainable flags ------------------------------------------------------------------------


def test_a_training_step_with_defaults_changes_only_fusion_params():
    model = fused_model()
    randomize_(model)  # nonzero gates, so every fusion parameter gets a gradient
    fusion = set(get_fusion_params(model))
    assert any(name.startswith("encoder.projection.") for name in fusion)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens, encoder_input, encoder_mask = inputs()
    tokens[:, 2] = VOCAB + 1  # an extra-vocabulary token, so the fusion rows train too

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logits = model.train()(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
    nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens.flatten().clamp(max=VOCAB - 1)
    ).backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == fusion


@pytest.mark.parametrize(
    ("decoder_trainable", "encoder_trainable", "fusion_trainable"),
    [(False, False, True), (True, False, True), (False, True, False), (True, True, False)],
)
def test_trainable_flags_select_parameters(decoder_trainable, encoder_trainable, fusion_trainable):
    model = fused_model(
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
    )
    fusion = set(get_fusion_params(model))
    expected = set()
    for name, _ in model.named_parameters():
        is_fusion = name in fusion
        own = decoder_trainable if name.startswith("decoder.") else encoder_trainable
        if (is_fusion and fusion_trainable) or (not is_fusion and own):
            expected.add(name)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected


def test_set_trainable_params_rejects_unknown_names():
    with pytest.raises(ValueError, match="not parameters of the model"):
        set_trainable_params(plain_decoder(), ["layers.0.attn.q_proj.wieght"])


def test_gradient_checkpointing_reaches_fusion_layers():
    model = fused_model()
    randomize_(model)
    model.train()
    tokens, encoder_input, encoder_mask = inputs()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask).logsumexp(
            -1
        ).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.decoder.set_gradient_checkpointing()
    assert model.decoder.layers[1].gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)


# -- caches ---------------------------------------------------------------------------------


def test_incremental_decoding_equals_full_forward_and_new_images_reset_the_cache():
    model = fused_model().eval()
    randomize_(model)
    s_e = 2 * TOKENS_PER_IMAGE
    model.setup_caches(2, torch.float32, encoder_max_seq_len=s_e, decoder_max_seq_len=16)
    assert model.caches_are_setup() and model.caches_are_enabled()
    for _ in range(2):  # the second prompt's images must replace the first's
        tokens, encoder_input, encoder_mask = inputs(s=7)
        with torch.no_grad():
            model.reset_caches()
            steps = [
                model(
                    tokens[:, :5],
                    encoder_input=encoder_input,
                    encoder_mask=encoder_mask[:, :5],
                    input_pos=torch.arange(5),
                )
            ]
            for i in range(5, 7):
                steps.append(
                    model(
                        tokens[:, i : i + 1],
                        encoder_mask=encoder_mask[:, i : i + 1],
                        input_pos=torch.tensor([i]),
                    )
                )
            with disable_kv_cache(model):
                full = model(tokens, encoder_input=encoder_input, encoder_mask=encoder_mask)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_rows_that_see_nothing_are_skipped_without_nan(backend):
    layer = cross_layer(backend=backend)
    randomize_(layer)
    x, y = torch.randn(2, 4, DIM), torch.randn(2, 6, DIM)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 3] = False
    with torch.no_grad():
        out = layer(x, encoder_input=y, encoder_mask=mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out[0, :2], x[0, :2], atol=0, rtol=0)
    torch.testing.assert_close(out[1, 3], x[1, 3], atol=0, rtol=0)
    assert (out[0, 2:] - x[0, 2:]).abs().max() > 0.1


# -- bad input ------------------------------------------------------------------------------


def test_encoder_input_without_fusion_layers_is_refused():
    decoder = plain_decoder()
    tokens, encoder_input, _ = inputs()
    with pytest.raises(ValueError, match="no cross-attention"):
        DeepFusionModel(decoder, encoder())(tokens, encoder_input=encoder_input)
    with pytest.raises(ValueError, match="no cross-attention"):
        decoder(tokens, encoder_input=torch.randn(2, 5, DIM))


def test_encoder_input_must_be_a_dict():
    tokens, encoder_input, _ = inputs()
    with pytest.raises(TypeError, match="dict of the encoder's keyword arguments"):
        fused_model()(tokens, encoder_input=encoder_input["images"])


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((2, 6, 30), torch.bool, r"\(2, 6, 30\) does not fit \[b, s, s_e\] = \[2, 6, 34\]"),
        ((2, 5, 34), torch.bool, r"\(2, 5, 34\) does not fit"),
        ((3, 6, 34), torch.bool, r"\(3, 6, 34\) does not fit"),
        ((2, 1, 6, 34), torch.bool, r"\(2, 1, 6, 34\) does not fit"),
        ((2, 6, 34), torch.float32, "must be bool"),
    ],
)
def test_encoder_mask_that_does_not_fit_is_refused(shape, dtype, message):
    tokens, encoder_input, _ = inputs()
    with pytest.raises(ValueError, match=message):
        fused_model()(
            tokens, encoder_input=encoder_input, encoder_mask=torch.ones(shape, dtype=dtype)
        )


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 3, 20, 20), r"expected images \[\.\.\., c, h, w\] = \[\.\.\., 3, 16, 16\]"),
        ((2, 1, 1, 16, 16), r"got shape \(2, 1, 1, 16, 16\)"),
        ((2, 3, 16, 16), r"must be \[b, n_images, c, h, w\]"),
    ],
)
def test_images_of_the_wrong_size_or_channels_are_refused(shape, message):
    tokens = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=message):
        fused_model()(tokens, encoder_input={"images": torch.randn(shape)})


def test_cross_attention_layer_options_are_checked():
    with pytest.raises(ValueError, match="empty_rows must be"):
        cross_layer(empty_rows="zero")
    with pytest.raises(ValueError, match="encoder_max_seq_len"):
        fused_model().setup_caches(1, torch.float32)
