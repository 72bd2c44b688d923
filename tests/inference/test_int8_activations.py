"""w8a8: int8 weights times activations rounded to int8 per 32 inputs, as llama.cpp's Q8_0
computes. Every path gives the same numbers; a row's result does not depend on the others."""

from __future__ import annotations

import pytest
import torch

from fusionlm.errors import InvalidInputError
from fusionlm.inference.int8_activations import W8A8Linear, pack_w8a8
from fusionlm.inference.quantize import WeightOnlyLinear, precision, quantize
from tests.helpers import tiny

pytestmark = pytest.mark.usefixtures("kernels")

PATHS = {"avx512": "avx512_vnni", "avx2": "avx2", "scalar": "scalar"}


def layer(n: int = 96, k: int = 128) -> W8A8Linear:
    int8 = WeightOnlyLinear.from_float(torch.randn(n, k), format="int8")
    return W8A8Linear(**pack_w8a8(int8.weight, int8.scale))


def test_packing_keeps_the_int8_weights_and_their_products():
    int8 = WeightOnlyLinear.from_float(torch.randn(48, 96) * 3, format="int8")
    w8a8 = W8A8Linear(**pack_w8a8(int8.weight, int8.scale))
    values, scales = w8a8.int8_weight()
    assert torch.equal(values, int8.weight) and torch.equal(scales, int8.scale)
    rows = torch.tensor([47, 0, 17, 17])
    assert torch.equal(w8a8.dequantize(rows), int8.dequantize(rows))
    assert torch.equal(w8a8.dequantize(), int8.dequantize())


@pytest.mark.parametrize("rows", [1, 8, 37, 130])  # one block, several, several row chunks
def test_every_path_gives_the_same_numbers_as_the_pytorch_reference(rows):
    """The integer sums are exact in every path and each channel's fp32 sum runs over the
    groups in one order, so the paths agree bit for bit; PyTorch sums in another order."""
    w8a8 = layer()
    x = torch.randn(rows, 128) * 4
    x[rows // 2] = 0  # a row of zeros gives zeros
    results = {}
    previous = torch.ops.fusionlm.use_isa("auto")
    try:
        for isa in torch.ops.fusionlm.cpu_isas():
            torch.ops.fusionlm.use_isa(isa)
            assert torch.ops.fusionlm.w8a8_path() in (PATHS[isa], "avx2")  # avx512 lacking VNNI
            results[torch.ops.fusionlm.w8a8_path()] = w8a8(x)
    finally:
        torch.ops.fusionlm.use_isa(previous)
    for y in results.values():
        assert torch.equal(y, results["scalar"])
    torch.testing.assert_close(results["scalar"], w8a8.reference(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(results["scalar"][rows // 2], torch.zeros(96))


def test_each_row_equals_that_row_alone():
    w8a8 = layer(160, 96)
    x = torch.randn(11, 96)
    together = w8a8(x)
    for r in range(11):
        assert torch.equal(w8a8(x[r : r + 1])[0], together[r])


def test_activations_are_rounded_to_int8_per_group_of_32():
    """Rounding x as the kernel does and multiplying exactly gives the kernel's result; the
    fp32 product of the same weights differs by the rounding of x."""
    w8a8 = layer(32, 64)
    x = torch.randn(2, 64)
    x[0, :32] *= 1000  # a loud group must not coarsen the other
    groups = x.view(2, 2, 32).double()
    scale = groups.abs().amax(dim=-1, keepdim=True) / 127
    rounded = ((groups / scale).round().clamp(-127, 127) * scale).view(2, 64)
    exact = rounded @ w8a8.dequantize().double().T
    torch.testing.assert_close(w8a8(x).double(), exact, atol=1e-3, rtol=1e-5)
    unrounded = x.double() @ w8a8.dequantize().double().T
    assert (w8a8(x).double() - unrounded).abs().max() > 1e-3


def test_the_kernel_runs_and_without_it_pytorch_computes_the_same(monkeypatch):
    w8a8 = layer()
    x = torch.randn(3, 128)
    with torch.profiler.profile() as profile:
        y = w8a8(x)
    assert "fusionlm::linear_w8a8" in {event.name for event in profile.events()}
    w8a8.streaming = False
    torch.testing.assert_close(w8a8(x), y, atol=1e-5, rtol=1e-5)


def test_widths_the_packing_cannot_take_are_refused_with_the_fix():
    int8 = WeightOnlyLinear.from_float(torch.randn(40, 64), format="int8")
    with pytest.raises(InvalidInputError, match=r"out divisible by 16.*use int8"):
        pack_w8a8(int8.weight, int8.scale)
    with pytest.raises(InvalidInputError, match="packed int8"):
        W8A8Linear(int8.weight, int8.scale)
    w8a8 = layer()
    with pytest.raises(InvalidInputError, match=r"scale of shape \[6, 4, 16\]"):
        W8A8Linear(w8a8.weight, w8a8.scale[:, :2])
    with pytest.raises(RuntimeError, match="weights must be packed int8"):
        torch.ops.fusionlm.linear_w8a8(torch.randn(2, 96), [w8a8.weight], [w8a8.scale])


def test_a_w8a8_model_stays_close_to_fp32_and_says_what_it_computes_with():
    model = tiny(intermediate_size=128)
    tokens = torch.randint(0, 96, (2, 9))
    expected = model(tokens)
    quantize(model, "w8a8")
    assert precision(model) == "w8a8 x16 weights"  # 7 a layer, the embedding, the head
    actual = model(tokens)
    assert (actual - expected).abs().max() < 0.05 * expected.abs().max()
