"""The compiled decode step's graph pass: small fp32 matmuls go to the streaming kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS, load_kernels
from fusionlm.inference.decode_step import streaming_matvecs

pytestmark = pytest.mark.skipif(not load_kernels(), reason="no C++ compiler for the kernels")


def linear_graph(x: torch.Tensor, weight: torch.Tensor) -> torch.fx.GraphModule:
    """``F.linear`` traced as inductor sees it after decomposition: ``mm(x, permute(w))``."""
    from torch._inductor.decomposition import select_decomp_table

    return make_fx(F.linear, decomposition_table=select_decomp_table())(x, weight)


def targets(graph: torch.fx.GraphModule) -> set:
    return {node.target for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("rows", [1, MATVEC_MAX_ROWS])
def test_small_fp32_matmuls_become_the_streaming_kernel(rows):
    x, weight = torch.randn(rows, 64), torch.randn(96, 64)
    graph = linear_graph(x, weight)
    streaming_matvecs()(graph.graph)
    graph.recompile()
    assert torch.ops.fusionlm.linear_f32.default in targets(graph)
    assert torch.ops.aten.mm.default not in targets(graph)
    torch.testing.assert_close(graph(x, weight), F.linear(x, weight))


@pytest.mark.parametrize(
    ("x", "weight"),
    [
        (torch.randn(MATVEC_MAX_ROWS + 1, 64), torch.randn(96, 64)),  # a prompt: GEMM wins
        (torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16)),
    ],
)
def test_other_matmuls_are_left_alone(x, weight):
    graph = linear_graph(x, weight)
    streaming_matvecs()(graph.graph)
    assert torch.ops.fusionlm.linear_f32.default not in targets(graph)
    assert torch.ops.aten.mm.default in targets(graph)
