"""The compiled decode step's graph pass: small fp32 matmuls go to the streaming kernel, and
kernel calls that share an input become one call."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS
from fusionlm.inference.decode_step import streaming_matvecs
from fusionlm.inference.quantize import WeightOnlyLinear

pytestmark = pytest.mark.usefixtures("kernels")


def traced(function, *args) -> torch.fx.GraphModule:
    """``function`` traced as inductor sees it after decomposition (``F.linear`` becomes
    ``mm(x, permute(w))``), with the pass applied."""
    from torch._inductor.decomposition import select_decomp_table

    graph = make_fx(function, decomposition_table=select_decomp_table())(*args)
    streaming_matvecs()(graph.graph)
    graph.recompile()
    return graph


def calls(graph: torch.fx.GraphModule, target) -> int:
    return len(graph.graph.find_nodes(op="call_function", target=target))


@pytest.mark.parametrize("rows", [1, MATVEC_MAX_ROWS])
def test_small_fp32_matmuls_become_the_streaming_kernel(rows):
    x, weight = torch.randn(rows, 64), torch.randn(96, 64)
    graph = traced(F.linear, x, weight)
    assert calls(graph, torch.ops.fusionlm.linear_f32.default) == 1
    assert calls(graph, torch.ops.aten.mm.default) == 0
    torch.testing.assert_close(graph(x, weight), F.linear(x, weight))


@pytest.mark.parametrize(
    ("x", "weight"),
    [
        (torch.randn(MATVEC_MAX_ROWS + 1, 64), torch.randn(96, 64)),  # a prompt: GEMM wins
        (torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)),
    ],
)
def test_other_matmuls_are_left_alone(x, weight):
    graph = traced(F.linear, x, weight)
    assert calls(graph, torch.ops.fusionlm.linear_f32.default) == 0
    assert calls(graph, torch.ops.aten.mm.default) == 1


def attention_like(x, q, k, v, o):
    """Three projections of one input, then one of another, as in attention."""
    return o(q(x) * k(x) + v(x))


def test_fp32_projections_of_one_input_are_one_call():
    x, weights = torch.randn(1, 64), [torch.randn(n, 64) for n in (64, 64, 64, 8)]

    def run(x, *weights):
        return attention_like(x, *(functools.partial(F.linear, weight=w) for w in weights))

    graph = traced(run, x, *weights)
    assert calls(graph, torch.ops.fusionlm.linear_f32.default) == 2  # q, k and v; then o
    torch.testing.assert_close(graph(x, *weights), run(x, *weights))


@pytest.mark.parametrize("format", ["bf16", "int8"])
def test_weight_only_projections_of_one_input_are_one_call(format):
    layers = [
        WeightOnlyLinear.from_float(torch.randn(n, 64), format=format) for n in (64, 64, 64, 8)
    ]
    x = torch.randn(1, 64)
    graph = traced(lambda x: attention_like(x, *layers), x)
    assert calls(graph, getattr(torch.ops.fusionlm, f"linear_{format}").default) == 2
    torch.testing.assert_close(graph(x), attention_like(x, *layers))
