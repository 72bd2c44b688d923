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
    model = example.build_model(llama(config), image_size=48, every_n_layers=1, train_encoder=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = example.train(
        model, tokenizer, steps=2, batch_size=2, lr=1e-3, image_size=48, seed=0, log_every=1
    )
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "the fusion parameters train"
    assert all(n.startswith("encoder.") or ".fusion_layer." in n for n in changed), changed

    accuracy, results = example.evaluate(
        model, tokenizer, count=2, image_size=48, seed=1, batch_size=2
    )
    assert {"shape", "colour", "position", "all three"} <= set(accuracy)
    example.save_grid(results, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0


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
