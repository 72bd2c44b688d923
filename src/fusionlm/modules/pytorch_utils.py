"""GPT-2 style ``Conv1D``, chunked feed-forward application and head-pruning helpers.

Behaviour follows transformers' ``pytorch_utils`` (``Conv1D``, ``apply_chunking_to_forward``,
``find_pruneable_heads_and_indices``, ``prune_linear_layer``, ``prune_conv1d_layer``,
``prune_layer``) so that checkpoints and head-pruning recipes written against transformers
give the same tensors here. Differences are in validation only: bad input raises a
``ValueError``/``TypeError`` with a message instead of an ``assert``, an ``IndexError``
deep inside torch, or a silently wrong result; and pruned layers keep the source dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fusionlm.errors import InvalidInputError

__all__ = [
    "Conv1D",
    "apply_chunking_to_forward",
    "find_pruneable_heads_and_indices",
    "prune_conv1d_layer",
    "prune_layer",
    "prune_linear_layer",
]


class Conv1D(nn.Module):
    """The "1D convolution" of OpenAI GPT / GPT-2: a linear layer with a transposed weight.

    ``y = x @ weight + bias`` with ``weight`` of shape ``[nx, nf]`` (in, out) and ``bias`` of
    shape ``[nf]``, i.e. ``nn.Linear(nx, nf)`` with ``linear.weight == conv1d.weight.T``.
    The parameter names and layout match transformers' ``Conv1D``, so GPT-2 state dicts load
    unchanged.

    Args:
        nf: number of output features.
        nx: number of input features.
        device: where to allocate the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: if ``nf`` or ``nx`` is negative.
    """

    def __init__(
        self,
        nf: int,
        nx: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if nf < 0 or nx < 0:
            raise InvalidInputError(f"Conv1D sizes must be non-negative, got nf={nf}, nx={nx}")
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(nf, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: ``weight ~ N(0, 0.02²)``, ``bias = 0``."""
        if self.weight.is_meta:
            # Nothing to fill, and normal_ on meta tensors costs ~0.5 s on first use (it
            # goes through torch._refs); pruning builds its layers on meta.
            return
        # Same draw order as transformers (one normal_ over the weight), so a given seed
        # produces the same weights in both libraries.
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., nx] -> [..., nf]``.

        Raises:
            ValueError: if the last dimension of ``x`` is not ``nx``.
        """
        if x.dim() == 0 or x.shape[-1] != self.nx:
            got = "a 0-d tensor" if x.dim() == 0 else f"last dim {x.shape[-1]}"
            raise InvalidInputError(
                f"Conv1D expected input with last dim nx={self.nx}, got {got} "
                f"(shape {tuple(x.shape)})"
            )
        # addmm fuses the bias add into the matmul, as transformers does; reshape (not view)
        # so non-contiguous inputs work too.
        out = torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight)
        return out.view(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def apply_chunking_to_forward(
    forward_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    chunk_dim: int,
    *input_tensors: torch.Tensor,
) -> torch.Tensor:
    """Apply ``forward_fn`` to ``input_tensors`` in chunks of ``chunk_size`` along ``chunk_dim``.

    Each input is split into ``input_tensors[0].shape[chunk_dim] // chunk_size`` pieces,
    ``forward_fn`` is called on matching pieces, and the outputs are concatenated along
    ``chunk_dim``. This trades speed for peak memory; if ``forward_fn`` is independent across
    ``chunk_dim`` (e.g. a feed-forward block applied per position, ``[b, s, d]`` chunked over
    ``s`` with ``chunk_dim=1``) the result equals ``forward_fn(*input_tensors)``.

    Example::

        def forward(self, hidden_states):  # [b, s, d]
            return apply_chunking_to_forward(self.forward_chunk, self.chunk_size, 1, hidden_states)

    Args:
        forward_fn: called as ``forward_fn(*chunks)``; must take exactly
            ``len(input_tensors)`` parameters (not checked for callables without an
            introspectable signature, such as some torch builtins).
        chunk_size: size of each chunk along ``chunk_dim``; ``0`` means no chunking (one call
            on the whole inputs).
        chunk_dim: dimension to chunk over (negative values count from the end).
        *input_tensors: the inputs of ``forward_fn``, all of the same size on ``chunk_dim``.

    Returns:
        The tensor ``forward_fn(*input_tensors)`` would return.

    Raises:
        ValueError: if no input tensor is given, if the number of inputs differs from
            ``forward_fn``'s parameter count, if ``chunk_size`` is negative, if the inputs
            differ in size on ``chunk_dim``, or if that size is not a multiple of
            ``chunk_size``.
    """
    if not input_tensors:
        raise InvalidInputError(
            "apply_chunking_to_forward needs at least one input tensor, got none"
        )
    # Like transformers, count every declared parameter: this catches a forward_fn that
    # expects more (or fewer) tensors than are passed before any work is done. Some
    # builtins (torch.tanh) have no introspectable signature; their own call checks arity.
    try:
        n_params: int | None = len(inspect.signature(forward_fn).parameters)
    except (TypeError, ValueError):
        n_params = None
    if n_params is not None and n_params != len(input_tensors):
        raise InvalidInputError(
            f"forward_fn expects {n_params} argument(s), but {len(input_tensors)} input "
            "tensor(s) were given"
        )
    if chunk_size < 0:
        raise InvalidInputError(f"chunk_size must be >= 0 (0 disables chunking), got {chunk_size}")
    if chunk_size == 0:
        return forward_fn(*input_tensors)

    size = input_tensors[0].shape[chunk_dim]
    for i, tensor in enumerate(input_tensors):
        if tensor.shape[chunk_dim] != size:
            raise InvalidInputError(
                f"All input tensors must have the same size on chunk_dim={chunk_dim}: input 0 "
                f"has {size}, input {i} has {tensor.shape[chunk_dim]}"
            )
    if size % chunk_size != 0:
        raise InvalidInputError(
            f"The size {size} of chunk_dim={chunk_dim} must be a multiple of "
            f"chunk_size={chunk_size}"
        )

    pieces = [tensor.split(chunk_size, dim=chunk_dim) for tensor in input_tensors]
    return torch.cat([forward_fn(*chunk) for chunk in zip(*pieces, strict=True)], dim=chunk_dim)


def find_pruneable_heads_and_indices(
    heads: Iterable[int],
    n_heads: int,
    head_size: int,
    already_pruned_heads: Iterable[int],
) -> tuple[set[int], torch.Tensor]:
    """Find which heads still need pruning and which weight rows/columns to keep.

    Head ids are the layer's *original* ids; ``n_heads`` is the number of heads the layer
    has *now* (after ``already_pruned_heads`` were removed), so the surviving heads are
    renumbered ``0 .. n_heads - 1`` in order.

    Args:
        heads: original ids of the heads to prune.
        n_heads: number of heads currently in the layer.
        head_size: size of each head.
        already_pruned_heads: original ids of heads pruned earlier.

    Returns:
        ``(heads_to_prune, index)``: the set ``heads - already_pruned_heads`` and a 1-D
        int64 tensor (on CPU) of the ``n_heads * head_size`` feature positions to keep,
        ascending, suitable for :func:`prune_linear_layer` / :func:`prune_conv1d_layer`.

    Raises:
        ValueError: if a head to prune does not exist in the current layer.
    """
    pruned_before = set(already_pruned_heads)
    to_prune = set(heads) - pruned_before
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    for head in to_prune:
        # Current position = original id minus the heads removed before it.
        current = head - sum(1 for h in pruned_before if h < head)
        if head < 0 or not 0 <= current < n_heads:
            raise InvalidInputError(
                f"Cannot prune head {head}: the layer has {n_heads} heads left "
                f"(already pruned: {sorted(pruned_before)})"
            )
        keep[current] = False
    index = keep.view(-1).nonzero().view(-1)
    return to_prune, index


def _check_dim(dim: int) -> None:
    if dim not in (0, 1):
        raise InvalidInputError(f"dim must be 0 or 1, got {dim}")


def _select(tensor: torch.Tensor, dim: int, index: torch.Tensor | None) -> nn.Parameter:
    """A fresh leaf parameter holding ``tensor`` (or its ``index`` entries along ``dim``).

    ``index_select`` already copies into new contiguous storage; the unindexed case is
    cloned so the pruned layer never shares memory with the original.
    """
    tensor = tensor.detach()
    if index is None:
        return nn.Parameter(tensor.clone(memory_format=torch.contiguous_format))
    return nn.Parameter(tensor.index_select(dim, index))


def prune_linear_layer(layer: nn.Linear, index: torch.Tensor, dim: int = 0) -> nn.Linear:
    """Keep only the entries ``index`` of a linear layer's weight along ``dim``.

    ``weight`` is ``[out, in]``: ``dim=0`` keeps output features (and the matching bias
    entries), ``dim=1`` keeps input features (the bias is kept whole). Used to remove
    attention heads.

    Args:
        layer: the layer to prune; it is not modified.
        index: 1-D int64 tensor of the positions to keep.
        dim: 0 (output features) or 1 (input features).

    Returns:
        A new ``nn.Linear`` with ``len(index)`` outputs (``dim=0``) or inputs (``dim=1``), on
        the layer's device and dtype, whose parameters have ``requires_grad=True``.

    Raises:
        ValueError: if ``dim`` is not 0 or 1.
    """
    _check_dim(dim)
    index = index.to(layer.weight.device)
    new_weight = _select(layer.weight, dim, index)
    has_bias = layer.bias is not None
    out_features, in_features = new_weight.shape
    # Built on the meta device: the parameters are replaced right away, so a real
    # initialisation would only cost time and advance the global RNG.
    new_layer = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
    new_layer.weight = new_weight
    if has_bias:
        new_layer.bias = _select(layer.bias, 0, None if dim == 1 else index)
    return new_layer


def prune_conv1d_layer(layer: Conv1D, index: torch.Tensor, dim: int = 1) -> Conv1D:
    """Keep only the entries ``index`` of a :class:`Conv1D` weight along ``dim``.

    ``weight`` is ``[nx, nf]`` (in, out), the transpose of a linear layer's: ``dim=1`` keeps
    output features (and the matching bias entries), ``dim=0`` keeps input features (the bias
    is kept whole). Used to remove attention heads.

    Args:
        layer: the layer to prune; it is not modified.
        index: 1-D int64 tensor of the positions to keep.
        dim: 1 (output features) or 0 (input features).

    Returns:
        A new :class:`Conv1D` on the layer's device and dtype, whose parameters have
        ``requires_grad=True``.

    Raises:
        ValueError: if ``dim`` is not 0 or 1.
    """
    _check_dim(dim)
    index = index.to(layer.weight.device)
    new_weight = _select(layer.weight, dim, index)
    nx, nf = new_weight.shape
    new_layer = Conv1D(nf, nx, device="meta")  # meta: see prune_linear_layer
    new_layer.weight = new_weight
    new_layer.bias = _select(layer.bias, 0, None if dim == 0 else index)
    return new_layer


def prune_layer(
    layer: nn.Linear | Conv1D, index: torch.Tensor, dim: int | None = None
) -> nn.Linear | Conv1D:
    """Prune an ``nn.Linear`` or :class:`Conv1D` to keep only the entries ``index``.

    Dispatches to :func:`prune_linear_layer` (default ``dim=0``) or
    :func:`prune_conv1d_layer` (default ``dim=1``); both defaults select output features.

    Args:
        layer: the layer to prune; it is not modified.
        index: 1-D int64 tensor of the positions to keep.
        dim: dimension of the weight to index; ``None`` picks the output-feature dimension.

    Returns:
        A new layer of the same kind, with ``requires_grad=True`` parameters.

    Raises:
        TypeError: if ``layer`` is neither an ``nn.Linear`` nor a :class:`Conv1D`.
        ValueError: if ``dim`` is not ``None``, 0 or 1.
    """
    if isinstance(layer, nn.Linear):
        return prune_linear_layer(layer, index, dim=0 if dim is None else dim)
    if isinstance(layer, Conv1D):
        return prune_conv1d_layer(layer, index, dim=1 if dim is None else dim)
    raise TypeError(
        f"prune_layer supports nn.Linear and Conv1D, got {type(layer).__module__}."
        f"{type(layer).__qualname__}"
    )
