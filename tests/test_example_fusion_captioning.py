"""examples/fusion_captioning.py: its pieces run end to end on a tiny decoder (the real
training is run by hand; see the script's docstring)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import fusionlm
from fusionlm import LlamaConfig, llama

pytest.importorskip("PIL")
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fusion_captioning.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("fusion_captioning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_two_training_steps_change_only_what_trains(example, tmp_path):
    tokenizer = fusionlm.load_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    encoder = example.ShapeEncoder(image_size=48, width=16, out_dim=32, background=0.5)
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    losses = example.pretrain_encoder(
        encoder, steps=2, batch_size=4, lr=1e-3, image_size=48, seed=0, log_every=1
    )
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(before) - {"projection.weight", "projection.bias"}, changed

    model = example.build_model(llama(config), encoder, every_n_layers=1, train_encoder=False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = example.train(
        model, tokenizer, steps=2, batch_size=2, lr=1e-3, image_size=48, seed=0, log_every=1
    )
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the fusion parameters train"
    fusion = {n for n in before if n.startswith("encoder.projection.") or ".fusion_layer." in n}
    assert changed <= fusion, changed - fusion

    accuracy, results = example.evaluate(
        model, tokenizer, count=2, image_size=48, seed=1, batch_size=2
    )
    assert {"shape", "colour", "position", "all three"} <= set(accuracy)
    example.save_grid(results, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_the_encoder_names_a_wrong_image_shape(example):
    encoder = example.ShapeEncoder(image_size=48, width=16, out_dim=32, background=0.5)
    assert encoder(torch.rand(2, 1, 3, 48, 48)).shape == (2, encoder.tokens_per_image, 32)
    with pytest.raises(ValueError, match=r"expected images \[b, n, 3, 48, 48\]"):
        encoder(torch.rand(2, 1, 3, 32, 32))


def test_captions_parse_back_to_their_attributes(example):
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = example.draw(rng, size=48)
        assert drawn.image.shape == (3, 48, 48)
        assert example.parse(drawn.caption) == {
            "shape": drawn.shape,
            "colour": drawn.colour,
            "position": drawn.position,
        }
    assert example.parse("A big BLUE thing.") == {"shape": None, "colour": "blue", "position": None}
