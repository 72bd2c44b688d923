"""Weight-only bf16 and int8 linears: fp32 math over the dequantized weight, in the streaming
kernels (a few rows) and in a GEMM (many rows)."""

from __future__ import annotations

import pytest
import torch
import torch.utils.cpp_extension
from torch import nn

from fusionlm.generation import generate
from fusionlm.inference import cpu_kernels
from fusionlm.inference import quantize as quantize_module
from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS
from fusionlm.inference.quantize import WeightOnlyLinear, quantize
from fusionlm.modules.decoder import TiedLinear
from tests.modules.test_decoder import tiny

ROWS = [1, 3, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 1]  # kernels up to MATVEC_MAX_ROWS, then GEMM


@pytest.mark.parametrize("format", ["bf16", "int8"])
@pytest.mark.parametrize("rows", ROWS)
def test_weight_only_linear_is_fp32_math_on_its_dequantized_weight(format, rows):
    linear = nn.Linear(96, 200)  # 96 = 3 groups of 32; 200 outputs split unevenly by threads
    q = WeightOnlyLinear.from_float(linear.weight, linear.bias, format=format)
    x = torch.randn(rows, 2, 96)
    reference = x @ q.dequantize().T + linear.bias
    torch.testing.assert_close(q(x), reference, atol=2e-5, rtol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_kernels_agree_with_the_fallback_without_them(format, monkeypatch):
    linear = nn.Linear(64, 40, bias=False)
    streaming = WeightOnlyLinear.from_float(linear.weight, format=format)
    monkeypatch.setattr(quantize_module, "load_kernels", lambda: False)
    fallback = WeightOnlyLinear.from_float(linear.weight, format=format)
    assert streaming.streaming and not fallback.streaming
    x = torch.randn(2, 64)
    torch.testing.assert_close(fallback(x), streaming(x), atol=2e-5, rtol=1e-5)


def test_a_missing_compiler_warns_and_falls_back(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernels.load_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="(?s)could not be built.*g\\+\\+ not found"):
            assert cpu_kernels.load_kernels() is False
    finally:
        cpu_kernels.load_kernels.cache_clear()


def test_int8_weights_are_off_by_at_most_half_a_step_per_group():
    weight = torch.randn(8, 64)
    weight[0, :32] *= 100  # one loud group must not coarsen the others
    q = WeightOnlyLinear.from_float(weight, format="int8")
    assert q.weight.dtype == torch.int8 and q.scale.shape == (8, 2)
    half_step = q.scale.repeat_interleave(32, dim=1) / 2
    assert ((q.dequantize() - weight).abs() <= half_step * (1 + 1e-5)).all()
    assert (q.dequantize()[0, 32:] - weight[0, 32:]).abs().max() < 0.02


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_quantized_model_keeps_greedy_tokens_of_its_dequantized_twin(format):
    # int8 needs every input width (64 and the MLP's 128) to be a multiple of 32.
    model = tiny(tie_word_embeddings=True, intermediate_size=128)
    twin = tiny(tie_word_embeddings=True, intermediate_size=128)
    quantize(model, format)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.output, WeightOnlyLinear) and not isinstance(model.output, TiedLinear)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, WeightOnlyLinear) and name != "output":
                twin.get_submodule(name).weight.copy_(module.dequantize())
        twin.output = nn.Linear(64, 96, bias=False)
        twin.output.weight.copy_(model.output.dequantize())
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    assert generate(model, prompts, max_new_tokens=16) == generate(twin, prompts, max_new_tokens=16)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="bf16 or int8"):
        WeightOnlyLinear(torch.zeros(4, 32))
    with pytest.raises(ValueError, match=r"scale of shape \[4, 1\], got \(4,\)"):
        WeightOnlyLinear(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="bf16 weights take no scale"):
        WeightOnlyLinear(torch.zeros(4, 32, dtype=torch.bfloat16), torch.ones(4, 1))
    with pytest.raises(ValueError, match="divisible by 32, got 48; use bf16"):
        WeightOnlyLinear.from_float(torch.zeros(4, 48), format="int8")
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        quantize(tiny(), "int4")
