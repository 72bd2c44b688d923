"""fusionlm's matvec and prompt kernels: the product of the weights they stand for, and a row's
result does not depend on the rows beside it."""

from __future__ import annotations

import pytest
import torch

from fusionlm.inference.cpu_kernels import INT8_GROUP_SIZE
from fusionlm.inference.quantize import WeightOnlyLinear

pytestmark = pytest.mark.usefixtures("kernels")


ISAS = ["avx512", "avx2", "scalar"]


def weights(format: str, n: int, k: int) -> tuple[list, torch.Tensor]:
    """The kernel's weight arguments, and the fp32 matrix they stand for."""
    if format == "int4":
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        scale = torch.rand(n, k // INT8_GROUP_SIZE) / 16
        offset = -torch.rand(n, k // INT8_GROUP_SIZE) / 2
        dense = WeightOnlyLinear(packed, scale, offset=offset).dequantize()
        return [[packed], [scale], [offset]], dense
    if format == "int8":
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale = torch.rand(n, k // INT8_GROUP_SIZE) / 64
        return [[w], [scale]], w.float() * scale.repeat_interleave(INT8_GROUP_SIZE, dim=1)
    w = torch.randn(n, k)
    if format == "bf16":
        return [[w.bfloat16()]], w.bfloat16().float()
    return [[w]], w


FORMATS = [("fp32", 100), ("bf16", 100), ("int8", 96), ("int4", 96)]


def tiled(x: torch.Tensor, args: list) -> torch.Tensor:
    """``linear_tiled`` on ``weights``' arguments for one int8 or int4 weight."""
    weight, scale, *offset = (arg[0] for arg in args)
    return torch.ops.fusionlm.linear_tiled(x, weight, scale, offset[0] if offset else None)


@pytest.fixture(params=ISAS)
def isa(request):
    """Each int4 path this CPU runs, forced for the test (the others are skipped)."""
    if request.param not in torch.ops.fusionlm.cpu_isas():
        pytest.skip(f"this CPU does not run the {request.param} kernels")
    previous = torch.ops.fusionlm.use_isa(request.param)
    yield request.param
    torch.ops.fusionlm.use_isa(previous)


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_each_path_equals_the_dequantized_product(isa, format, rows, k):
    """Every path of the int8 and int4 kernels against fp64 math on the weights they stand
    for, with blocks of 1, 2, 4 and 8 rows and odd and even group counts (the vector paths
    add alternate groups into two sums)."""
    args, dense = weights(format, 50, k)
    x = torch.randn(rows, k)
    (y,) = getattr(torch.ops.fusionlm, f"linear_{format}")(x, *args)
    reference = (x.double() @ dense.double().T).float()
    torch.testing.assert_close(y, reference, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 40])
@pytest.mark.parametrize("k", [32, 576])
def test_each_path_of_the_tiles_equals_the_dequantized_product(isa, format, rows, k):
    """``linear_tiled`` (a prompt's rows) on every path, against fp64 math: blocks of 6 (3)
    rows and the rows left over, 50 channels (tiles of 4 (3) and the channels left over)."""
    args, dense = weights(format, 50, k)
    x = torch.randn(rows, k)
    reference = (x.double() @ dense.double().T).float()
    torch.testing.assert_close(tiled(x, args), reference, atol=1e-4 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_tiles_multiply_by_the_dequantized_weight_bit_for_bit(isa, format):
    """Rows of the identity pick single weights out of the tiles: each equals
    ``fusionlm::dequantize``'s value exactly (one multiply, then one add, never fused), so a
    prompt in tiles and a longer one in a GEMM multiply by the same numbers."""
    args, dense = weights(format, 42, 96)
    assert torch.equal(tiled(torch.eye(96), args).T, dense)


@pytest.mark.parametrize("format", ["int8", "int4"])
@pytest.mark.parametrize("kernel", ["matvec", "tiled"])
def test_each_path_runs_its_own_code(isa, format, kernel):
    """The paths sum in different orders, so forcing one changes the low bits of a long
    product unless it is the path that ran anyway: proof that ``use_isa`` switches code."""
    args, _ = weights(format, 64, 1536)
    matvec = getattr(torch.ops.fusionlm, f"linear_{format}")
    x = torch.randn(3 if kernel == "matvec" else 20, 1536)
    results = {}
    for path in torch.ops.fusionlm.cpu_isas():
        torch.ops.fusionlm.use_isa(path)
        results[path] = matvec(x, *args)[0] if kernel == "matvec" else tiled(x, args)
    torch.ops.fusionlm.use_isa(isa)
    for path, y in results.items():
        assert torch.equal(y, results[isa]) == (path == isa), path


def test_fp16_offsets_give_their_fp32_values_products_bit_for_bit(isa):
    """int4 offsets held in fp16 (as Q4_0 and Q4_1 blocks store them) are widened exactly: the
    products, and the dequantized weight, equal those of the same values in fp32, also for a
    weight with fp16 offsets beside one with fp32 offsets in one call."""
    (packed, scale, offset), _ = weights("int4", 40, 608)  # 19 groups: a vector and a tail
    half = offset[0].half()
    x = torch.randn(5, 608)
    (expected,) = torch.ops.fusionlm.linear_int4(x, packed, scale, [half.float()])
    mixed = torch.ops.fusionlm.linear_int4(x, packed * 2, scale * 2, [half, half.float()])
    assert torch.equal(mixed[0], expected) and torch.equal(mixed[1], expected)
    assert torch.equal(
        torch.ops.fusionlm.dequantize(packed[0], scale[0], half),
        torch.ops.fusionlm.dequantize(packed[0], scale[0], half.float()),
    )
    x = torch.randn(20, 608)
    assert torch.equal(
        torch.ops.fusionlm.linear_tiled(x, packed[0], scale[0], half),
        torch.ops.fusionlm.linear_tiled(x, packed[0], scale[0], half.float()),
    )
    with pytest.raises(RuntimeError, match="float32 or float16"):
        torch.ops.fusionlm.linear_int4(x, packed, scale, [offset[0].bfloat16()])


def test_use_isa_refuses_unknown_paths():
    with pytest.raises(RuntimeError, match="unknown kernel path 'avx9'; choose auto"):
        torch.ops.fusionlm.use_isa("avx9")
    assert torch.ops.fusionlm.use_isa("auto") == "auto"


@pytest.mark.parametrize(("format", "k"), FORMATS)
def test_each_row_equals_that_row_alone(format, k):
    """Rows share weight loads in blocks of 2, 4 or 8; each row sums in the same order in any
    block, so an m-row product equals each row computed alone, bit for bit (a server's
    requests must not change each other's text), and the product itself."""
    op = getattr(torch.ops.fusionlm, f"linear_{format.replace('fp32', 'f32')}")
    args, dense = weights(format, 70, k)
    x = torch.randn(7, k)
    (together,) = op(x, *args)
    for m in range(7):
        assert torch.equal(together[m], op(x[m : m + 1], *args)[0][0])
    torch.testing.assert_close(together, x @ dense.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("format", "k"), FORMATS)
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
    if format in ("int8", "int4"):  # integers hold no NaN: the scales do
        poisoned = [args[0], [torch.full_like(args[1][0], nan)], *args[2:]]
    else:
        poisoned = [[torch.full_like(args[0][0], nan)]]
    (y,) = op(x, *poisoned)
    assert torch.equal(y[[1, 4, 5]], torch.zeros(3, 40)) and y[0].isnan().all()


@pytest.mark.parametrize("format", ["int8", "int4"])
def test_tiles_give_each_row_as_that_row_alone_and_skip_rows_of_zeros(format):
    """A prompt's rows, like a decode step's: each row's result is the one it gets alone, bit
    for bit, whichever block of rows it falls in, and rows of zeros give zeros without reading
    the weight (NaN scales)."""
    args, _ = weights(format, 42, 576)
    x = torch.randn(23, 576)
    x[[3, 4, 17]] = 0.0
    together = tiled(x, args)
    for m in range(23):
        assert torch.equal(together[m], tiled(x[m : m + 1], args)[0])
    poisoned = [args[0], [torch.full_like(args[1][0], float("nan"))], *args[2:]]
    y = tiled(x, poisoned)
    assert torch.equal(y[[3, 4, 17]], torch.zeros(3, 42)) and y[0].isnan().all()


def test_tiles_refuse_inputs_that_do_not_fit():
    (w, scale), _ = weights("int8", 8, 64)
    with pytest.raises(RuntimeError, match=r"x must be a float32 \[m, 64\] tensor"):
        torch.ops.fusionlm.linear_tiled(torch.randn(20, 96), w[0], scale[0], None)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous uint8 \[n, k / 2\]"):
        torch.ops.fusionlm.linear_tiled(torch.randn(20, 64), w[0], scale[0], scale[0])
    with pytest.raises(RuntimeError, match=r"scale must be a contiguous float32 \[8, 2\]"):
        torch.ops.fusionlm.linear_tiled(torch.randn(20, 64), w[0], scale[0].double(), None)
