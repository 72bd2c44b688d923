"""transformers directories: the key table, sharded files, saving back, and broken inputs."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import fusionlm
from fusionlm.checkpoint.keys import HF_LLAMA_KEYS
from tests.helpers import make_hf_llama


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}]
)
def test_key_table_round_trips_every_parameter(tmp_path, overrides):
    reference = make_hf_llama(tmp_path, **overrides)
    model = fusionlm.load_model(tmp_path)
    ours = set(model.state_dict())
    theirs = {HF_LLAMA_KEYS.to_theirs(k) for k in ours}
    expected = set(reference.state_dict())
    if overrides.get("tie_word_embeddings"):
        expected.discard("lm_head.weight")
    assert theirs == expected
    assert {HF_LLAMA_KEYS.to_ours(k) for k in theirs} == ours


def test_sharded_directory_loads(tmp_path):
    reference = make_hf_llama(tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = fusionlm.load_model(tmp_path / "sharded")
    tokens = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_save_hf_loads_in_transformers_with_equal_logits(tmp_path, tied):
    import transformers

    make_hf_llama(
        tmp_path / "src",
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "linear", "rope_theta": 5e4, "factor": 2.0},
    )
    model = fusionlm.load_model(tmp_path / "src")
    out = fusionlm.save_hf(model, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens), atol=1e-4, rtol=0)
    assert reloaded.config.tie_word_embeddings is tied
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_bf16_load_keeps_dtype(hf_llama_dir):
    directory, _ = hf_llama_dir
    model = fusionlm.load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randint(0, 96, (1, 4))).dtype == torch.bfloat16


# -- bad input ------------------------------------------------------------------------------


@pytest.fixture
def copy_of(hf_llama_dir, tmp_path):
    directory, _ = hf_llama_dir
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        fusionlm.load_model(tmp_path / "nothing")


def test_missing_config_field_is_named(copy_of):
    edit_config(copy_of, hidden_size=None)
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['hidden_size'\]"):
        fusionlm.load_model(copy_of)


def test_invalid_config_json(copy_of):
    (copy_of / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fusionlm.load_model(copy_of)


def test_unsupported_architecture(copy_of):
    edit_config(copy_of, model_type="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        fusionlm.load_model(copy_of)


def test_shapes_that_do_not_fit_are_listed(copy_of):
    edit_config(copy_of, intermediate_size=120)
    with pytest.raises(
        ValueError, match=r"do not fit the model config: shape mismatch \['layers.0.mlp.w1.weight"
    ):
        fusionlm.load_model(copy_of)


def test_missing_tensors_are_listed(copy_of):
    edit_config(copy_of, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"missing \['layers.2."):
        fusionlm.load_model(copy_of)


def test_truncated_safetensors(copy_of):
    weights = copy_of / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fusionlm.load_model(copy_of)


def test_pickle_checkpoints_are_refused(copy_of):
    (copy_of / "model.safetensors").rename(copy_of / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files, which fusionlm never loads"):
        fusionlm.load_model(copy_of)
