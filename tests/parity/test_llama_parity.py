"""fusionlm's Llama equals transformers' LlamaForCausalLM on random tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import fusionlm
from tests.helpers import make_hf_llama

ROPE = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "longrope": {
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.3 * i for i in range(8)],
        "original_max_position_embeddings": 16,
    },
}

# Each architectural option appears at least once; head_dim 16 = hidden/heads unless set.
CONFIGS = {
    "mha-default": {"num_key_value_heads": 4},
    "gqa-linear-tied": {"rope_type": "linear", "tie_word_embeddings": True},
    "mqa-dynamic-bias": {
        "num_key_value_heads": 1,
        "rope_type": "dynamic",
        "attention_bias": True,
        "mlp_bias": True,
        "max_position_embeddings": 16,
    },
    "gqa-yarn-headdim": {"rope_type": "yarn", "head_dim": 24},
    "mha-llama3-tied-bias": {
        "num_key_value_heads": 4,
        "rope_type": "llama3",
        "tie_word_embeddings": True,
        "attention_bias": True,
    },
    "gqa-longrope-headdim": {
        "rope_type": "longrope",
        "head_dim": 16,
        "max_position_embeddings": 64,
    },
}

BACKENDS = ["eager", "sdpa", "flex"]


def _hf_overrides(spec: dict) -> dict:
    spec = dict(spec)
    rope_type = spec.pop("rope_type", "default")
    params = dict(ROPE[rope_type])
    if rope_type == "longrope":
        half = spec.get("head_dim", 16) // 2
        params["short_factor"] = params["short_factor"][:half] + [1.0] * (half - 8)
        params["long_factor"] = params["long_factor"][:half] + [2.0] * (half - 8)
    spec["rope_parameters"] = {"rope_type": rope_type, "rope_theta": 10_000.0, **params}
    return spec


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return (
        request.param,
        directory,
        make_hf_llama(directory, **_hf_overrides(CONFIGS[request.param])),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(checkpoint, backend):
    _, directory, reference = checkpoint
    model = fusionlm.load_model(directory, attn_backend=backend)
    # 24 crosses the 16 trained positions of the scaled RoPE types (dynamic NTK recomputes).
    tokens = torch.randint(0, reference.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = model(tokens)
    assert expected.abs().max() > 1.0, "reference logits too small for a meaningful comparison"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_hidden_states_match_transformers(hf_llama_dir):
    directory, reference = hf_llama_dir
    model = fusionlm.load_model(directory)
    model.output_hidden_states = [0, 1]
    tokens = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True).hidden_states
        *hidden, logits = model(tokens)
    assert len(hidden) == 2
    for ours, theirs in zip(hidden, expected[:2], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference(tokens).logits, atol=1e-4, rtol=0)


def test_transformers_4x_config_form_loads_the_same(tmp_path):
    """4.x wrote rope_theta + rope_scaling instead of rope_parameters."""
    reference = make_hf_llama(tmp_path, **_hf_overrides({"rope_type": "llama3"}))
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config_path.write_text(json.dumps(config))
    model = fusionlm.load_model(tmp_path)
    assert model.config.rope_type == "llama3"
    tokens = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-4, rtol=0)
