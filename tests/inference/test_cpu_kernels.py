"""fusionlm's matvec kernels: a row's result does not depend on the rows beside it."""

from __future__ import annotations

import pytest
import torch

from fusionlm.inference.cpu_kernels import INT8_GROUP_SIZE, load_kernels

pytestmark = pytest.mark.skipif(not load_kernels(), reason="no C++ compiler for the kernels")


def weights(format: str, n: int, k: int) -> tuple[list, torch.Tensor]:
    """The kernel's weight arguments, and the fp32 matrix they stand for."""
    if format == "int8":
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n, k // INT8_GROUP_SIZE) / 64
        return [[w], [scale]], w.float() * scale.repeat_interleave(INT8_GROUP_SIZE, dim=1)
    w = torch.randn(n, k)
    if format == "bf16":
        return [[w.bfloat16()]], w.bfloat16().float()
    return [[w]], w


@pytest.mark.parametrize(("format", "k"), [("fp32", 100), ("bf16", 100), ("int8", 96)])
def test_each_row_equals_that_row_alone(format, k):
    """Rows share weight loads in blocks of 2 or 4; each row sums in the same order in any
    block, so an m-row product equals each row computed alone, bit for bit (a server's
    requests must not change each other's text), and the product itself."""
    op = getattr(torch.ops.fusionlm, f"linear_{format.replace('fp32', 'f32')}")
    args, dense = weights(format, 70, k)
    x = torch.randn(7, k)
    (together,) = op(x, *args)
    for m in range(7):
        assert torch.equal(together[m], op(x[m : m + 1], *args)[0][0])
    torch.testing.assert_close(together, x @ dense.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("format", "k"), [("fp32", 100), ("bf16", 100), ("int8", 96)])
def test_rows_of_zeros_are_skipped(format, k):
    """A server's idle rows carry zeros: they give zeros without the weights being read
    (NaN weights or scales would make any row that read them NaN), and the other rows are as computed alone."""
    op = getattr(torch.ops.fusionlm, f"linear_{format.replace('fp32', 'f32')}")
    args, _ = weights(format, 40, k)
    x = torch.randn(6, k)
    x[[1, 4, 5]] = 0.0
    (y,) = op(x, *args)
    assert torch.equal(y[[1, 4, 5]], torch.zeros(3, 40))
    assert torch.equal(y[[0, 2, 3]], op(x[[0, 2, 3]], *args)[0])
    nan = float("nan")
    if format == "int8":  # int8 holds no NaN: the scales do
        poisoned = [args[0], [torch.full_like(args[1][0], nan)]]
    else:
        poisoned = [[torch.full_like(args[0][0], nan)]]
    (y,) = op(x, *poisoned)
    assert torch.equal(y[[1, 4, 5]], torch.zeros(3, 40)) and y[0].isnan().all()
