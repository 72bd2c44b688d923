"""FinetuneConfig: TOML + key=value overrides; every mistake is a ValueError naming the key."""

from __future__ import annotations

import pytest

from fusionlm.training import FinetuneConfig, config_keys, load_config


def test_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'train_data = "train.jsonl"\nlora = true\nlora_targets = ["q_proj", "w1"]\n'
        "learning_rate = 1\nseq_len = 256\n"
    )
    config = load_config(
        path, ["seq_len=128", "bf16=true", "val_data=v.jsonl", "lora_targets=k_proj,v_proj"]
    )
    assert config.train_data == "train.jsonl" and config.lora is True and config.bf16 is True
    assert config.seq_len == 128 and config.val_data == "v.jsonl"
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.lora_targets == ["k_proj", "v_proj"]
    assert load_config(path, ["val_data=none"]).val_data is None
    assert load_config(None, ["train_data=x.jsonl"]) == FinetuneConfig(train_data="x.jsonl")


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        (
            'train_data = "t"\nlearning_rte = 0.1\n',
            [],
            "unknown config key 'learning_rte'.*valid keys: model, tokenizer, train_data",
        ),
        (
            'train_data = "t"\n',
            ["epoch=2"],
            "unknown config key 'epoch' \\(command line\\); valid keys",
        ),
        (
            'train_data = "t"\nnum_output_chunks = 8\n',
            [],
            "config key 'num_output_chunks' .* is now loss_chunk_tokens",
        ),
        ('train_data = "t"\n', ["bf16=maybe"], "bf16='maybe': expected true or false"),
        ('train_data = "t"\nseq_len = "long"\n', [], "seq_len must be an integer, got 'long'"),
        ('train_data = "t"\n', ["seq_len=long"], "seq_len='long': expected an integer"),
        ('train_data = "t"\n', ["lora=maybe"], "lora='maybe': expected true or false"),
        ('train_data = "t"\n', ["seq_len"], "must look like key=value"),
        ('train_data = "t"\nbatch_size = 0\n', [], "batch_size must be >= 1"),
        ('train_data = "t"\nlora_targets = ["qkv"]\n', [], "lora_targets \\['qkv'\\] invalid"),
        ('train_data = "t"\n[lora]\nrank = 4\n', [], "\\[lora\\] is a table; the config is flat"),
        ('train_data = "t"\n', ["attn_backend=fast"], "unknown attention backend 'fast'"),
        ('train_data = "t\n', [], "is not valid TOML"),
        ("seq_len = 64\n", [], "train_data is required"),
    ],
)
def test_mistakes_are_named(tmp_path, text, overrides, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")
    assert "lora_rank" in config_keys() and "resume" in config_keys()
