"""Weight-only int8 linears: the same math as a float linear over the dequantized weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionlm.generation import generate
from fusionlm.inference.quantize import Int8Linear, quantize_int8
from fusionlm.modules.decoder import TiedLinear
from tests.modules.test_decoder import tiny


def test_int8_linear_equals_float_linear_on_dequantized_weights():
    linear = nn.Linear(64, 48)
    q = Int8Linear.from_float(linear.weight, linear.bias)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() >= 125
    x = torch.randn(3, 5, 64)
    # The kernel multiplies bf16 activations by int8 weights and rounds the product to bf16.
    reference = (x.bfloat16().float() @ q.dequantize().T).bfloat16().float() + linear.bias
    torch.testing.assert_close(q(x), reference, atol=2e-2, rtol=1e-2)
    half_step = q.scale.float()[:, None] / 2
    assert ((q.dequantize() - linear.weight).abs() <= half_step * (1 + 1e-5)).all()


def test_quantized_model_keeps_greedy_tokens_of_its_dequantized_twin():
    model = tiny(tie_word_embeddings=True)
    twin = tiny(tie_word_embeddings=True)
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.output, Int8Linear) and not isinstance(model.output, TiedLinear)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear) and name != "output":
                twin.get_submodule(name).weight.copy_(module.dequantize())
        twin.output = nn.Linear(64, 96, bias=False)
        twin.output.weight.copy_(model.output.dequantize())
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    assert generate(model, prompts, max_new_tokens=16) == generate(
        twin.to(torch.bfloat16), prompts, max_new_tokens=16
    )


def test_bad_int8_weights_are_refused():
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match=r"scale must be \[4\]"):
        Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
