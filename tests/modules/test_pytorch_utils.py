"""Parity of fusionlm.modules.pytorch_utils with transformers.pytorch_utils."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers.pytorch_utils as hf_pu
from torch import nn

from fusionlm.modules.pytorch_utils import (
    Conv1D,
    apply_chunking_to_forward,
    find_pruneable_heads_and_indices,
    prune_conv1d_layer,
    prune_layer,
    prune_linear_layer,
)

# --- references -------------------------------------------------------------------------
# transformers 5 dropped find_pruneable_heads_and_indices, prune_conv1d_layer and
# prune_layer (4.x still has them). When the installed version lacks one, the test uses a
# plain restatement of the 4.x behaviour below, written independently of our implementation
# (loops and masks, operating on transformers' own Conv1D).


def _ref_find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    heads = set(heads) - set(already_pruned_heads)
    keep = [True] * (n_heads * head_size)
    for head in heads:
        shifted = head - len([h for h in already_pruned_heads if h < head])
        for j in range(shifted * head_size, (shifted + 1) * head_size):
            keep[j] = False
    return heads, torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)


def _ref_prune_conv1d_layer(layer, index, dim=1):
    w = layer.weight.detach()
    new_w = w[index] if dim == 0 else w[:, index]
    new_b = layer.bias.detach() if dim == 0 else layer.bias.detach()[index]
    new = hf_pu.Conv1D(new_w.shape[1], new_w.shape[0])
    with torch.no_grad():
        new.weight.copy_(new_w)
        new.bias.copy_(new_b)
    return new


def _ref_prune_layer(layer, index, dim=None):
    if isinstance(layer, nn.Linear):
        return hf_pu.prune_linear_layer(layer, index, dim=0 if dim is None else dim)
    return ref_prune_conv1d_layer(layer, index, dim=1 if dim is None else dim)


ref_find_pruneable = getattr(
    hf_pu, "find_pruneable_heads_and_indices", _ref_find_pruneable_heads_and_indices
)
ref_prune_conv1d_layer = getattr(hf_pu, "prune_conv1d_layer", _ref_prune_conv1d_layer)
ref_prune_layer = getattr(hf_pu, "prune_layer", _ref_prune_layer)


def _random_index(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:k].sort().values


def _paired_conv1d(nf: int, nx: int) -> tuple[Conv1D, hf_pu.Conv1D]:
    ours = Conv1D(nf, nx)
    with torch.no_grad():
        ours.bias.normal_()  # a zero bias would hide bias mistakes
    theirs = hf_pu.Conv1D(nf, nx)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _assert_close(actual, expected, *, rtol=1.3e-6, atol=1e-5):
    # torch.testing.assert_close costs ~0.7 s of lazy imports on first use; this file
    # only needs same shape/dtype and an elementwise tolerance.
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"max abs diff {(actual - expected).abs().max().item()}"
    )


def _assert_fresh_params(new: nn.Module, old: nn.Module) -> None:
    for (name, p_new), (_, p_old) in zip(
        new.named_parameters(), old.named_parameters(), strict=True
    ):
        assert p_new.requires_grad, name
        assert p_new.is_leaf and p_new.grad is None, name
        assert p_new.device == p_old.device and p_new.dtype == p_old.dtype, name
        assert p_new.is_contiguous(), name
        assert p_new.untyped_storage().data_ptr() != p_old.untyped_storage().data_ptr(), name


# --- Conv1D -----------------------------------------------------------------------------


def test_conv1d_shapes_init_and_repr_match_transformers():
    torch.manual_seed(0)
    theirs = hf_pu.Conv1D(7, 5)
    torch.manual_seed(0)
    ours = Conv1D(7, 5)
    assert ours.weight.shape == (5, 7) and ours.bias.shape == (7,)
    assert (ours.nf, ours.nx) == (7, 5)
    assert torch.equal(ours.weight, theirs.weight)  # same seed -> same draw
    assert torch.equal(ours.bias, torch.zeros(7))
    assert repr(ours) == repr(theirs) == "Conv1D(nf=7, nx=5)"
    assert list(ours.state_dict()) == list(theirs.state_dict())

    big = Conv1D(256, 256)
    assert abs(big.weight.std().item() - 0.02) < 1e-3
    assert abs(big.weight.mean().item()) < 1e-3


def test_conv1d_factory_kwargs():
    layer = Conv1D(3, 4, dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64
    with pytest.raises(TypeError):
        Conv1D(3, 4, torch.float64)  # options are keyword-only
    with pytest.raises(ValueError, match="non-negative"):
        Conv1D(-1, 4)


@pytest.mark.parametrize("shape", [(2, 3, 5), (5,), (4, 5), (2, 1, 3, 5), (0, 5)])
def test_conv1d_forward_equals_transformers(shape):
    torch.manual_seed(1)
    ours, theirs = _paired_conv1d(6, 5)
    x = torch.randn(shape)
    out = ours(x)
    assert out.shape == (*shape[:-1], 6)
    assert torch.equal(out, theirs(x))


def test_conv1d_equals_linear_with_transposed_weight():
    torch.manual_seed(2)
    ours, _ = _paired_conv1d(6, 5)
    linear = nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(ours.weight.T)
        linear.bias.copy_(ours.bias)
    x = torch.randn(3, 4, 5)
    _assert_close(ours(x), linear(x))


def test_conv1d_non_contiguous_input_and_backward():
    torch.manual_seed(3)
    ours, theirs = _paired_conv1d(4, 5)
    x = torch.randn(5, 3).T  # [3, 5], non-contiguous
    assert torch.equal(ours(x), theirs(x.contiguous()))
    ours(x).sum().backward()
    assert ours.weight.grad is not None and ours.bias.grad is not None
    _assert_close(ours.bias.grad, torch.full((4,), 3.0))


def test_conv1d_wrong_last_dim_raises():
    layer = Conv1D(4, 5)
    with pytest.raises(ValueError, match=r"nx=5.*got last dim 4"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="0-d"):
        layer(torch.tensor(1.0))


# --- apply_chunking_to_forward ----------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "chunk_dim"), [(0, 1), (1, 1), (2, 1), (6, 1), (3, -2), (2, 0)]
)
def test_apply_chunking_equals_unchunked_and_transformers(chunk_size, chunk_dim):
    torch.manual_seed(4)
    linear = nn.Linear(8, 8)
    calls: list[int] = []

    def forward_chunk(hidden, gate):  # per-position, so chunking over b or s is exact
        calls.append(hidden.shape[chunk_dim])
        return linear(hidden) * torch.sigmoid(gate)

    hidden, gate = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    expected = linear(hidden) * torch.sigmoid(gate)
    out = apply_chunking_to_forward(forward_chunk, chunk_size, chunk_dim, hidden, gate)
    size = hidden.shape[chunk_dim]
    if chunk_size == 0:
        assert calls == [size]
    else:
        assert calls == [chunk_size] * (size // chunk_size)
    _assert_close(out, expected, rtol=0, atol=1e-6)
    theirs = hf_pu.apply_chunking_to_forward(forward_chunk, chunk_size, chunk_dim, hidden, gate)
    assert torch.equal(out, theirs)


def test_apply_chunking_documented_call_shape():
    x = torch.randn(2, 4, 3)
    out = apply_chunking_to_forward(torch.tanh, 2, 1, x)
    assert torch.equal(out, torch.tanh(x))


def test_apply_chunking_raises_on_bad_input():
    def one(x):
        return x

    def two(x, y):
        return x + y

    x = torch.randn(2, 6, 3)
    with pytest.raises(ValueError, match=r"expects 2 argument.*1 input"):
        apply_chunking_to_forward(two, 2, 1, x)
    with pytest.raises(ValueError, match=r"expects 1 argument.*2 input"):
        apply_chunking_to_forward(one, 2, 1, x, x)
    with pytest.raises(ValueError, match="at least one input"):
        apply_chunking_to_forward(one, 2, 1)
    with pytest.raises(ValueError, match=r"same size on chunk_dim=1.*6.*4"):
        apply_chunking_to_forward(two, 2, 1, x, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"size 6.*multiple of chunk_size=4"):
        apply_chunking_to_forward(one, 4, 1, x)
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        apply_chunking_to_forward(one, -1, 1, x)


# --- find_pruneable_heads_and_indices ---------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "n_heads", "head_size", "already"),
    [
        ([], 4, 3, set()),
        ([1], 4, 3, set()),
        ([0, 3], 4, 2, set()),
        ([0, 1, 2, 3], 4, 2, set()),
        ([2, 5], 4, 3, {0, 3}),  # 6 original heads, 0 and 3 gone: 2 -> 1, 5 -> 3
        ([0, 2, 4], 5, 2, {0, 1}),  # 0 already pruned: skipped
        ([1, 1, 3], 4, 1, set()),
    ],
)
def test_find_pruneable_heads_and_indices_matches_transformers(heads, n_heads, head_size, already):
    ours_heads, ours_index = find_pruneable_heads_and_indices(heads, n_heads, head_size, already)
    ref_heads, ref_index = ref_find_pruneable(heads, n_heads, head_size, set(already))
    assert ours_heads == ref_heads
    assert ours_index.dtype == torch.long
    assert torch.equal(ours_index, ref_index)


def test_find_pruneable_heads_and_indices_random():
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        n_orig = int(torch.randint(1, 9, (1,), generator=gen))
        head_size = int(torch.randint(1, 5, (1,), generator=gen))
        perm = torch.randperm(n_orig, generator=gen).tolist()
        n_already = int(torch.randint(0, n_orig, (1,), generator=gen))
        already = set(perm[:n_already])
        heads = perm[: int(torch.randint(0, n_orig + 1, (1,), generator=gen))]
        args = (heads, n_orig - len(already), head_size)
        ours = find_pruneable_heads_and_indices(*args, already)
        ref = ref_find_pruneable(*args, set(already))
        assert ours[0] == ref[0]
        assert torch.equal(ours[1], ref[1])


def test_find_pruneable_heads_rejects_missing_heads():
    with pytest.raises(ValueError, match="head 4"):
        find_pruneable_heads_and_indices([4], 4, 2, set())
    with pytest.raises(ValueError, match="head -1"):
        find_pruneable_heads_and_indices([-1], 4, 2, set())
    with pytest.raises(ValueError, match="head 5"):  # 5 original heads: ids 0..4
        find_pruneable_heads_and_indices([5], 4, 2, {1})


# --- pruning ----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_prune_linear_layer_matches_transformers(dim, bias):
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(6)
    layer = nn.Linear(10, 12, bias=bias)
    index = _random_index(layer.weight.shape[dim], 5, gen)
    ours = prune_linear_layer(layer, index, dim=dim)
    theirs = hf_pu.prune_linear_layer(layer, index, dim=dim)
    assert type(ours) is nn.Linear
    assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features)
    assert torch.equal(ours.weight, theirs.weight)
    assert (ours.bias is None) == (theirs.bias is None)
    if bias:
        assert torch.equal(ours.bias, theirs.bias)
    _assert_fresh_params(ours, layer)

    x = torch.randn(3, ours.in_features)
    assert torch.equal(ours(x), theirs(x))


def test_prune_linear_layer_semantics_and_dtype():
    torch.manual_seed(7)
    layer = nn.Linear(6, 8, dtype=torch.float64)
    index = torch.tensor([1, 4, 5])
    x = torch.randn(2, 6, dtype=torch.float64)
    rows = prune_linear_layer(layer, index)  # keep outputs 1, 4, 5
    assert rows.weight.dtype == torch.float64 and rows.bias.dtype == torch.float64
    _assert_close(rows(x), layer(x)[:, index])
    cols = prune_linear_layer(layer, index, 1)  # positional dim, as documented
    expected = x[:, index] @ layer.weight[:, index].T + layer.bias
    _assert_close(cols(x[:, index]), expected)
    before = copy.deepcopy(layer.state_dict())
    with torch.no_grad():
        rows.weight.add_(1.0)
        cols.bias.add_(1.0)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k  # pruned copies share nothing with the source


@pytest.mark.parametrize("dim", [0, 1])
def test_prune_conv1d_layer_matches_transformers(dim):
    torch.manual_seed(8)
    gen = torch.Generator().manual_seed(8)
    ours_layer, their_layer = _paired_conv1d(12, 10)  # weight [10, 12]
    index = _random_index(ours_layer.weight.shape[dim], 5, gen)
    ours = prune_conv1d_layer(ours_layer, index, dim=dim)
    theirs = ref_prune_conv1d_layer(their_layer, index, dim=dim)
    assert type(ours) is Conv1D
    assert (ours.nf, ours.nx) == (theirs.nf, theirs.weight.shape[0])
    assert torch.equal(ours.weight, theirs.weight)
    assert torch.equal(ours.bias, theirs.bias)
    _assert_fresh_params(ours, ours_layer)
    x = torch.randn(2, 3, ours.nx)
    assert torch.equal(ours(x), theirs(x))


def test_prune_conv1d_layer_semantics():
    torch.manual_seed(9)
    layer, _ = _paired_conv1d(8, 6)
    index = torch.tensor([0, 3, 7])
    x = torch.randn(4, 6)
    out_pruned = prune_conv1d_layer(layer, index)  # default dim=1: keep outputs
    _assert_close(out_pruned(x), layer(x)[:, index])
    in_index = torch.tensor([1, 2, 5])
    in_pruned = prune_conv1d_layer(layer, in_index, 0)
    _assert_close(in_pruned(x[:, in_index]), x[:, in_index] @ layer.weight[in_index] + layer.bias)


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_prune_layer_dispatch_matches_transformers(dim):
    torch.manual_seed(10)
    gen = torch.Generator().manual_seed(10)
    linear = nn.Linear(9, 9)
    ours_conv, their_conv = _paired_conv1d(9, 9)
    index = _random_index(9, 4, gen)

    ours_lin = prune_layer(linear, index, dim)
    their_lin = ref_prune_layer(linear, index, dim)
    assert type(ours_lin) is nn.Linear
    assert torch.equal(ours_lin.weight, their_lin.weight)
    assert torch.equal(ours_lin.bias, their_lin.bias)

    ours_c = prune_layer(ours_conv, index, dim=dim)
    their_c = ref_prune_layer(their_conv, index, dim=dim)
    assert type(ours_c) is Conv1D
    assert torch.equal(ours_c.weight, their_c.weight)
    assert torch.equal(ours_c.bias, their_c.bias)


def test_prune_layer_rejects_other_layers_and_dims():
    with pytest.raises(TypeError, match="Conv1d"):
        prune_layer(nn.Conv1d(3, 3, 1), torch.tensor([0]))
    with pytest.raises(ValueError, match="dim must be 0 or 1"):
        prune_layer(nn.Linear(3, 3), torch.tensor([0]), dim=2)
    with pytest.raises(ValueError, match="dim must be 0 or 1"):
        prune_conv1d_layer(Conv1D(3, 3), torch.tensor([0]), dim=-1)


def test_head_pruning_end_to_end():
    """Prune heads 1 then 3 (of 4) from a q projection: outputs of the kept heads survive."""
    torch.manual_seed(11)
    n_heads, head_size, d = 4, 3, 8
    q = nn.Linear(d, n_heads * head_size)
    x = torch.randn(2, d)
    full = q(x).view(2, n_heads, head_size)

    heads, index = find_pruneable_heads_and_indices([1], n_heads, head_size, set())
    q1 = prune_linear_layer(q, index)
    heads2, index2 = find_pruneable_heads_and_indices([1, 3], n_heads - 1, head_size, heads)
    assert heads2 == {3}
    q2 = prune_linear_layer(q1, index2)
    _assert_close(q2(x).view(2, 2, head_size), full[:, [0, 2]])
