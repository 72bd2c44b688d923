"""LoRA adapters in PEFT's layout: transformers + peft load ours (and we load theirs) with equal logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fusionlm
from fusionlm.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fusionlm.modules.lora import apply_lora, merge_lora
from tests.helpers import randomize_adapters

peft = pytest.importorskip("peft")
ALL = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]


def _hf(directory):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_peft_loads_our_adapter_and_merged_model_with_equal_logits(hf_llama_dir, tmp_path):
    directory, _ = hf_llama_dir
    model = fusionlm.load_model(directory)
    apply_lora(model, targets=ALL, rank=4, alpha=12, dropout=0.1)
    randomize_adapters(model)
    model.eval()
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        ours = model(tokens)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(directory))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_hf(directory), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        base = _hf(directory)(tokens).logits
    assert (base - ours).abs().max() > 0.1  # the adapter matters

    merge_lora(model)
    fusionlm.save_hf(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(
            _hf(tmp_path / "merged")(tokens).logits, ours, atol=1e-4, rtol=1e-4
        )


def test_we_load_an_adapter_peft_saved(hf_llama_dir, tmp_path):
    directory, _ = hf_llama_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["v_proj", "down_proj"])
        theirs = peft.get_peft_model(_hf(directory), config)
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_" in name:
                    p.normal_()
        theirs.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, 96, (1, 9))
    model = fusionlm.load_model(directory)
    wrapped = load_peft_adapter(model, tmp_path / "adapter")
    assert wrapped == [
        "layers.0.attn.v_proj",
        "layers.0.mlp.w2",
        "layers.1.attn.v_proj",
        "layers.1.mlp.w2",
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens), theirs.eval()(tokens).logits, atol=1e-4, rtol=1e-4
        )
