"""LoRA: a no-op at start, only adapters train, merging keeps the function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fusionlm
from fusionlm.modules.lora import LoRALinear, apply_lora, get_adapter_params, merge_lora
from tests.helpers import randomize_adapters


def test_lora_linear_starts_as_the_base_and_adds_the_scaled_update():
    base = nn.Linear(12, 7, bias=True)
    lora = LoRALinear.from_linear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 12)
    torch.testing.assert_close(lora(x), base(x))
    assert lora.weight.data_ptr() == base.weight.data_ptr()
    with torch.no_grad():
        lora.lora_b.weight.normal_()
    expected = base(x) + 2.0 * (x @ lora.lora_a.weight.T @ lora.lora_b.weight.T)
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.merged()(x), expected, atol=1e-5, rtol=1e-5)


def test_apply_lora_wraps_targets_and_freezes_the_rest(hf_llama_dir):
    model = fusionlm.load_model(hf_llama_dir[0])
    wrapped = apply_lora(model, targets=["q_proj", "output_proj", "w2"], rank=4, alpha=8)
    assert wrapped == [
        f"layers.{i}.{name}"
        for i in range(2)
        for name in ("attn.q_proj", "attn.output_proj", "mlp.w2")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(model)) and len(trainable) == 12
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(fusionlm.load_model(hf_llama_dir[0]), targets=["o_proj"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, targets=["q_proj"], rank=4, alpha=8)


def test_training_changes_only_adapter_parameters(hf_llama_dir):
    model = fusionlm.load_model(hf_llama_dir[0]).train()
    apply_lora(model, targets=["q_proj", "v_proj", "w1"], rank=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, 96, (2, 16))
    for _ in range(3):
        loss = nn.functional.cross_entropy(
            model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_a." in k or ".lora_b." in k}
    # A starts random and B at zero: after steps both have moved, nothing else has.
    assert changed == adapters


def test_merged_weights_give_the_logits_of_base_plus_adapter(hf_llama_dir):
    model = fusionlm.load_model(hf_llama_dir[0])
    keys = set(model.state_dict())
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base = model(tokens)
    apply_lora(
        model,
        targets=["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"],
        rank=4,
        alpha=8,
    )
    randomize_adapters(model)
    with torch.no_grad():
        with_adapter = model(tokens)
        assert (with_adapter - base).abs().max() > 0.1
        merged = merge_lora(model)
        assert len(merged) == 14 and set(model.state_dict()) == keys
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(tokens), with_adapter, atol=1e-5, rtol=1e-5)
