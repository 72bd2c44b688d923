"""Weight-only bf16, int8 and int4 linears: fp32 math over the dequantized weight, in the
streaming kernels (a few rows), and in tiles (int8, int4) or a GEMM (bf16) for many rows."""

from __future__ import annotations

import pytest
import torch
import torch.utils.cpp_extension
from torch import nn

from fusionlm.generation import generate
from fusionlm.inference import cpu_kernels
from fusionlm.inference import quantize as quantize_module
from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS
from fusionlm.inference.quantize import (
    QUANTIZE_ROWS,
    TILED_MAX_ROWS,
    QuantizedEmbedding,
    WeightOnlyLinear,
    quantize,
)
from fusionlm.modules.decoder import TiedLinear
from tests.helpers import tiny

# Kernels up to MATVEC_MAX_ROWS, then tiles (int8, int4) up to TILED_MAX_ROWS, then GEMM; x has
# 2 rows per row.
ROWS = [1, 3, MATVEC_MAX_ROWS // 2 + 1, TILED_MAX_ROWS // 2 + 1]
FORMATS = ["bf16", "int8", "int4"]


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("rows", ROWS)
def test_weight_only_linear_is_fp32_math_on_its_dequantized_weight(format, rows):
    linear = nn.Linear(96, 200)  # 96 = 3 groups of 32; 200 outputs split unevenly by threads
    q = WeightOnlyLinear.from_float(linear.weight, linear.bias, format=format)
    x = torch.randn(rows, 2, 96)
    reference = x.double() @ q.dequantize().double().T + linear.bias
    torch.testing.assert_close(q(x), reference.float(), atol=2e-5, rtol=1e-5)
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_the_dequantize_kernel_equals_pytorch_ops_bit_for_bit(format):
    """One pass in C++ (``fusionlm::dequantize``) or four PyTorch ops: the same numbers,
    every value one multiply and one add, whole or by rows."""
    q = WeightOnlyLinear.from_float(torch.randn(70, 96) * 3, format=format)
    assert q.streaming
    fallback = WeightOnlyLinear(q.weight, q.scale, offset=q.offset)
    fallback.streaming = False
    assert torch.equal(q.dequantize(), fallback.dequantize())
    rows = torch.tensor([5, 5, 69, 0])
    assert torch.equal(q.dequantize(rows), fallback.dequantize(rows))
    assert torch.equal(q.dequantize(slice(3, 9)), fallback.dequantize()[3:9])


@pytest.mark.parametrize(
    ("format", "rows"),
    [("bf16", MATVEC_MAX_ROWS + 1), ("int4", TILED_MAX_ROWS), ("int4", TILED_MAX_ROWS + 1)],
)
def test_many_rows_never_dequantize_a_large_weight_whole(format, rows):
    """A prompt's rows never dequantize the whole of a large matrix (an output head): int8 and
    int4 prompts of up to TILED_MAX_ROWS rows run in tiles of a few weight rows, longer ones
    and bf16 are GEMMs over QUANTIZE_ROWS weight rows at a time."""
    q = WeightOnlyLinear.from_float(torch.randn(QUANTIZE_ROWS + 70, 64), format=format)
    x = torch.randn(rows, 64)
    calls = []
    dequantize = q.dequantize
    q.dequantize = lambda rows=None: calls.append(rows) or dequantize(rows)
    y = q(x)
    tiled = format != "bf16" and rows <= TILED_MAX_ROWS
    expected = [slice(0, QUANTIZE_ROWS), slice(QUANTIZE_ROWS, 2 * QUANTIZE_ROWS)]
    assert calls == ([] if tiled else expected)
    torch.testing.assert_close(y, x @ dequantize().T, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("format", FORMATS)
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


def test_int4_weights_are_off_by_at_most_half_a_step_per_group():
    weight = torch.randn(8, 64)
    weight[0, :32] *= 100  # one loud group must not coarsen the others
    weight[1, 32:] = 0.5  # a constant group is exact
    q = WeightOnlyLinear.from_float(weight, format="int4")
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (8, 32)
    assert q.scale.shape == q.offset.shape == (8, 2)
    half_step = q.scale.repeat_interleave(32, dim=1) / 2
    assert ((q.dequantize() - weight).abs() <= half_step * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(q.dequantize()[1, 32:], weight[1, 32:])
    assert (q.dequantize()[0, 32:] - weight[0, 32:]).abs().max() < 0.3


def test_an_embedding_table_dequantizes_only_the_rows_looked_up():
    table = WeightOnlyLinear.from_float(torch.randn(10, 64), format="int4")
    embedding = QuantizedEmbedding(table)
    tokens = torch.tensor([[3, 3, 9], [0, 1, 2]])
    assert torch.equal(embedding(tokens), table.dequantize()[tokens])
    assert (embedding.num_embeddings, embedding.embedding_dim) == (10, 64)


@pytest.mark.parametrize("format", FORMATS)
def test_quantized_model_keeps_greedy_tokens_of_its_dequantized_twin(format):
    # int8 and int4 need every input width (64 and the MLP's 128) to be a multiple of 32.
    model = tiny(tie_word_embeddings=True, intermediate_size=128)
    twin = tiny(tie_word_embeddings=True, intermediate_size=128)
    quantize(model, format)
    assert not any(isinstance(m, nn.Linear | nn.Embedding) for m in model.modules())
    # The tied head is the embedding's table itself, streamed in its stored format.
    assert isinstance(model.tok_embeddings, QuantizedEmbedding)
    assert model.output is model.tok_embeddings.table and not isinstance(model.output, TiedLinear)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, WeightOnlyLinear) and name.startswith("layers."):
                twin.get_submodule(name).weight.copy_(module.dequantize())
        twin.tok_embeddings.weight.copy_(model.output.dequantize())
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    assert generate(model, prompts, max_new_tokens=16) == generate(twin, prompts, max_new_tokens=16)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="bf16 or int8"):
        WeightOnlyLinear(torch.zeros(4, 32))
    with pytest.raises(
        ValueError, match=r"int4 weights need an offset of shape \[4, 2\], got None"
    ):
        WeightOnlyLinear(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2))
    with pytest.raises(ValueError, match="int8 weights take no offset"):
        WeightOnlyLinear(
            torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), offset=torch.ones(4, 1)
        )
    with pytest.raises(ValueError, match=r"scale of shape \[4, 1\], got \(4,\)"):
        WeightOnlyLinear(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="bf16 weights take no scale or offset"):
        WeightOnlyLinear(torch.zeros(4, 32, dtype=torch.bfloat16), torch.ones(4, 1))
    with pytest.raises(ValueError, match="divisible by 32, got 48; use bf16"):
        WeightOnlyLinear.from_float(torch.zeros(4, 48), format="int8")
    with pytest.raises(ValueError, match="int4 weights need in_features divisible by 32, got 48"):
        WeightOnlyLinear.from_float(torch.zeros(4, 48), format="int4")
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        quantize(tiny(), "int3")


def test_a_killed_builds_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    """torch waits forever for the lock a killed kernel build leaves; one older than a build
    could take is removed (said on stderr), a fresh one (a build running now) kept."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    assert not cpu_kernels.clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu_kernels.clear_stale_lock(tmp_path) and not lock.exists()
    assert "did not finish" in capsys.readouterr().err
    assert not cpu_kernels.clear_stale_lock(tmp_path)
