"""Weight-only bf16, int8 and int4 linears and embeddings: smaller weights, fp32 math, fast CPU
decoding; and w8a8 (``int8_activations``), whose activations are rounded to int8 as well."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError
from fusionlm.inference.cpu_kernels import INT8_GROUP_SIZE, MATVEC_MAX_ROWS, load_kernels
from fusionlm.inference.int8_activations import W8A8Linear, pack_w8a8
from fusionlm.inference.weight_formats import WEIGHT_FORMATS
from fusionlm.modules.decoder import TiedLinear

GROUP_SIZE = INT8_GROUP_SIZE
"""Inputs per scale (and offset) of int8 and int4 weights."""
TILED_MAX_ROWS = 128
"""int8 and int4 layers run prompts of more than ``MATVEC_MAX_ROWS`` and up to this many rows
in ``fusionlm::linear_tiled``, longer ones as fp32 GEMMs over the dequantized weight. A whole
prompt's forward on the default model, int8, tiles / GEMM in one process: 0.78 at 34 tokens,
1.0 at 128, 1.02-1.04 at 256 (BLAS packs its operands for cache blocks and runs near peak on
long prompts; at 512 tokens the tiles cost 13% of prefill speed)."""
QUANTIZE_ROWS = 2048
"""Weight rows converted at a time: bounds the float temporaries of quantizing, and of a GEMM
over more rows than the kernels take, to a few MB."""


def _check_group_width(in_features: int, format: str) -> None:
    if in_features % GROUP_SIZE:
        raise InvalidInputError(
            f"{format} weights need in_features divisible by {GROUP_SIZE}, got {in_features}; "
            "use bf16 for this model"
        )


def pack_int4(values: Tensor) -> Tensor:
    """4-bit values ``[out, in]`` (uint8, 0-15) -> ``[out, in / 2]`` bytes, per group of 32
    inputs: input ``j`` in the low nibble of byte ``j``, input ``j + 16`` in its high nibble
    (ggml's Q4_0 / Q4_1 block order)."""
    groups = values.reshape(values.shape[0], -1, 2, GROUP_SIZE // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(values.shape[0], -1)


def unpack_int4(packed: Tensor) -> Tensor:
    """``pack_int4``'s inverse: ``[out, in / 2]`` bytes -> ``[out, in]`` uint8 values."""
    groups = packed.reshape(packed.shape[0], -1, 1, GROUP_SIZE // 2)
    return torch.cat([groups & 0x0F, groups >> 4], dim=2).reshape(packed.shape[0], -1)


class WeightOnlyLinear(nn.Module):
    """A linear layer that stores its weight in bf16, in int8 with one scale per 32 inputs
    (llama.cpp's Q8_0 layout), or in int4 with a scale and an offset per 32 inputs (Q4_0,
    Q4_1 and Q4_K blocks hold exactly such weights), and computes in fp32.

    ``y = x @ W.T + bias`` with ``W = dequantize()``: for int8 ``W = scale * q``, for int4
    ``W = scale * q + offset`` (``q`` in 0-15, two a byte, see ``pack_int4``). Only the stored
    weight loses precision, never the activations. On the default model, 10 prompts x 32
    greedy tokens agree with fp32 on 320 of 320 tokens with bf16 weights, 294 with int8
    weights, but 176 when the activations entering each linear are rounded to bf16 as well.
    Up to ``MATVEC_MAX_ROWS`` rows (a decode step's batch) run in ``cpu_kernels``' streaming
    kernels (built when the first layer is made), which skip rows of zeros. int8 and int4
    prompts of up to ``TILED_MAX_ROWS`` rows run in ``fusionlm::linear_tiled``, which
    dequantizes a few weight rows at a time into a buffer the L1 cache holds and multiplies
    every input row by it (on the default model's int8 layers, 37 rows: 1.6x the streaming
    kernel's speed and 1.5x that of dequantizing the whole weight for one GEMM). Longer
    prompts, bf16 prompts, or any without the kernels are fp32 GEMMs over the weight
    dequantized ``QUANTIZE_ROWS`` rows at a time. Each row's result depends on that row
    alone. The output has the input's dtype. For inference: the weight is a buffer, and the
    kernels have no backward.

    A table of embeddings is a ``WeightOnlyLinear`` too (``dequantize(rows)`` reads only the
    rows it is asked for): a tied output head and ``QuantizedEmbedding`` share one.

    Args:
        weight: bf16 or int8 ``[out, in]``, or uint8 ``[out, in / 2]`` (int4, packed).
        scale: for int8 and int4, fp32 ``[out, in / 32]``; None for bf16.
        bias: ``[out]`` or None.
        offset: for int4, ``[out, in / 32]``, fp32 or fp16 (Q4_0 and Q4_1 blocks hold fp16
            offsets, kept so: 6.6 MB less for the default model, at no cost in speed); None
            otherwise.

    Raises:
        ValueError: another weight dtype, or a scale or offset that does not fit the weight.
    """

    def __init__(
        self,
        weight: Tensor,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        offset: Tensor | None = None,
    ):
        super().__init__()
        dtypes = (torch.bfloat16, torch.int8, torch.uint8)
        if weight.dim() != 2 or weight.dtype not in dtypes:
            raise InvalidInputError(
                "weight must be bf16 or int8 [out, in], or uint8 [out, in / 2] (int4), got "
                f"{weight.dtype} {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape
        if weight.dtype == torch.uint8:
            in_features *= 2
        if weight.dtype == torch.bfloat16:
            if scale is not None or offset is not None:
                raise InvalidInputError("bf16 weights take no scale or offset")
        else:
            format = "int8" if weight.dtype == torch.int8 else "int4"
            _check_group_width(in_features, format)
            if format == "int8" and offset is not None:
                raise InvalidInputError("int8 weights take no offset")
            expected = (out_features, in_features // GROUP_SIZE)
            needed = (
                {"a scale": scale, "an offset": offset} if format == "int4" else {"a scale": scale}
            )
            for name, tensor in needed.items():
                if tensor is None or tuple(tensor.shape) != expected:
                    got = None if tensor is None else tuple(tensor.shape)
                    raise InvalidInputError(
                        f"{format} weights need {name} of shape {list(expected)}, got {got}"
                    )
            scale = scale.float().contiguous()
            if offset is not None:  # fp16 as Q4_0 and Q4_1 blocks hold it, else fp32
                offset = (offset if offset.dtype == torch.float16 else offset.float()).contiguous()
        self.in_features, self.out_features = in_features, out_features
        self.streaming = load_kernels()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_float(
        cls, weight: Tensor, bias: Tensor | None = None, *, format: str
    ) -> WeightOnlyLinear:
        """A layer computing with ``weight`` stored in ``format`` (see ``weight_in_format``).

        Raises:
            ValueError: an unknown ``format``; int8 or int4 with ``in`` not a multiple of 32.
        """
        return cls(**weight_in_format(weight, format=format), bias=bias)

    @property
    def format(self) -> str:
        """``"bf16"``, ``"int8"`` or ``"int4"``."""
        return {torch.bfloat16: "bf16", torch.int8: "int8", torch.uint8: "int4"}[self.weight.dtype]

    def dequantize(self, rows: Tensor | slice | None = None) -> Tensor:
        """The fp32 weight ``[out, in]`` this layer computes with, or only its ``rows`` (indices
        or a slice: ``[len(rows), in]``)."""
        index = slice(None) if rows is None else rows
        weight = self.weight[index]
        if self.scale is None:
            return weight.float()
        offset = None if self.offset is None else self.offset[index]
        if self.streaming:
            return torch.ops.fusionlm.dequantize(weight, self.scale[index], offset)
        n = weight.shape[0]
        values = weight if self.offset is None else unpack_int4(weight)
        groups = values.view(n, -1, GROUP_SIZE).float() * self.scale[index][..., None]
        if self.offset is not None:
            groups += self.offset[index][..., None]
        return groups.view(n, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        flat = x.reshape(-1, self.in_features).float()
        rows = flat.shape[0]
        max_rows = MATVEC_MAX_ROWS if self.scale is None else TILED_MAX_ROWS
        if not self.streaming or rows > max_rows:
            y = self._gemm(flat)
        elif rows > MATVEC_MAX_ROWS:
            y = torch.ops.fusionlm.linear_tiled(flat, self.weight, self.scale, self.offset)
        elif self.scale is None:
            (y,) = torch.ops.fusionlm.linear_bf16(flat, [self.weight])
        elif self.offset is None:
            (y,) = torch.ops.fusionlm.linear_int8(flat, [self.weight], [self.scale])
        else:
            (y,) = torch.ops.fusionlm.linear_int4(flat, [self.weight], [self.scale], [self.offset])
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _gemm(self, x: Tensor) -> Tensor:
        """``x [m, in] @ W.T`` in fp32, dequantizing ``QUANTIZE_ROWS`` weight rows at a time."""
        if self.out_features <= QUANTIZE_ROWS:
            return F.linear(x, self.dequantize())
        y = x.new_empty(x.shape[0], self.out_features)
        for start in range(0, self.out_features, QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            torch.mm(x, self.dequantize(rows).T, out=y[:, rows])
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format}, bias={self.bias is not None}"
        )


class QuantizedEmbedding(nn.Module):
    """An embedding lookup over a ``WeightOnlyLinear``'s table: ``[...] -> [..., d]`` in
    ``dtype`` (the model's activations'), dequantizing only the rows it reads. A tied output
    head is the same table."""

    def __init__(
        self, table: WeightOnlyLinear | W8A8Linear, *, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [...]`` -> ``[..., d]``."""
        rows = self.table.dequantize(tokens.reshape(-1)).to(self.dtype)
        return rows.view(*tokens.shape, self.embedding_dim)


def precision(model: nn.Module) -> str:
    """What a model computes with, for people: its float dtype (``"float32"``), or its
    weight-only formats by how many matrices each holds (``"int4 x210, int8 x1 weights"``)."""
    tables = {id(m): m for m in model.modules() if isinstance(m, (WeightOnlyLinear, W8A8Linear))}
    counts = collections.Counter(table.format for table in tables.values())
    if not counts:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    return ", ".join(f"{format} x{n}" for format, n in counts.most_common()) + " weights"


def weight_in_format(weight: Tensor, *, format: str) -> dict[str, Tensor]:
    """A float ``[out, in]`` weight as ``WeightOnlyLinear`` stores it (its constructor's
    arguments):

    - ``bf16``: rounded to bf16.
    - ``int8``: symmetric per group of 32 inputs, ``scale = max|w| / 127``.
    - ``int4``: asymmetric per group of 32 inputs, ``offset = min(w)``,
      ``scale = (max(w) - min(w)) / 15`` (as Q4_1).
    - ``w8a8``: as int8, packed for ``W8A8Linear`` (``pack_w8a8``).

    Either way every weight is off by at most half a step of its group.

    Raises:
        ValueError: an unknown ``format``; int8 or int4 with ``in`` not a multiple of 32.
    """
    if format not in WEIGHT_FORMATS:
        raise InvalidInputError(f"unknown weight format {format!r}; choose one of {WEIGHT_FORMATS}")
    w = weight.detach()
    if format == "bf16":
        return {"weight": w.bfloat16()}
    out_features, in_features = w.shape
    _check_group_width(in_features, format)
    groups = in_features // GROUP_SIZE
    int4 = format == "int4"
    width = in_features // 2 if int4 else in_features
    device = "meta" if w.is_meta else None  # meta: the structure only, for a loader
    stored = {
        "weight": torch.empty(
            out_features, width, dtype=torch.uint8 if int4 else torch.int8, device=device
        ),
        "scale": torch.empty(out_features, groups, device=device),
    }
    if int4:
        stored["offset"] = torch.empty(out_features, groups, device=device)
    if device != "meta":
        _round_into(stored, w, int4=int4)
    return pack_w8a8(stored["weight"], stored["scale"]) if format == "w8a8" else stored


def _round_into(stored: dict[str, Tensor], weight: Tensor, *, int4: bool) -> None:
    """``weight_in_format``'s rounding of ``weight [out, in]`` into ``stored``'s buffers, in
    blocks of rows, so the float temporaries stay small beside a large matrix."""
    in_features = weight.shape[1]
    groups = in_features // GROUP_SIZE
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        block = weight[rows].float().view(-1, groups, GROUP_SIZE)
        if int4:
            low, high = block.amin(dim=-1), block.amax(dim=-1)
            scale = ((high - low) / 15.0).clamp_(min=1e-12)
            values = ((block - low[..., None]) / scale[..., None]).round_().clamp_(0, 15)
            stored["weight"][rows] = pack_int4(values.view(-1, in_features).to(torch.uint8))
            stored["offset"][rows] = low
        else:
            scale = (block.abs().amax(dim=-1) / 127.0).clamp_(min=1e-12)
            values = (block / scale[..., None]).round_().clamp_(-127, 127)
            stored["weight"][rows] = values.view(-1, in_features).to(torch.int8)
        stored["scale"][rows] = scale


def layer_in_format(weight: Tensor, bias: Tensor | None = None, *, format: str) -> nn.Module:
    """A linear layer computing with ``weight`` stored in ``format``: a ``W8A8Linear`` for
    w8a8, else a ``WeightOnlyLinear`` (see ``weight_in_format``)."""
    if format == "w8a8":
        return W8A8Linear(**weight_in_format(weight, format=format), bias=bias)
    return WeightOnlyLinear.from_float(weight, bias, format=format)


def linear_weights_in_format(name: str, tensor: Tensor, *, format: str) -> dict[str, Tensor]:
    """One checkpoint tensor as ``quantize(model, format)`` stores it: a linear layer's weight
    (any 2-D ``*.weight``) becomes the layer's buffers under ``name``'s prefix (``*.weight``,
    ``*.scale``, ``*.offset``), the token embedding's under ``tok_embeddings.table.*``; every
    other tensor stays as it is. Lets a loader convert each tensor as it reads it, never holding
    the whole float model."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return {name: tensor}
    prefix = stored_prefix(name)
    return {prefix + key: value for key, value in weight_in_format(tensor, format=format).items()}


def stored_prefix(name: str) -> str:
    """Where a checkpoint's 2-D ``*.weight`` goes in a quantized model's state dict: the
    token embedding into its table (``tok_embeddings.table.``), a linear in place."""
    if name == "tok_embeddings.weight":
        return "tok_embeddings.table."
    return name.removesuffix("weight")


def quantize(model: nn.Module, format: str) -> nn.Module:
    """Store every ``nn.Linear`` and the token embedding in ``format`` (``"bf16"``,
    ``"int8"``, ``"int4"`` or ``"w8a8"``), in place: linears become ``WeightOnlyLinear``s
    (``W8A8Linear``s for w8a8); a decoder's
    ``tok_embeddings`` (an ``nn.Embedding``) becomes a ``QuantizedEmbedding``, and a tied
    output head the same table.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown format, or (int8, int4, w8a8) a layer whose input width is not
            a multiple of 32 (w8a8: or whose output width is not one of 16).
    """
    if format not in WEIGHT_FORMATS:
        raise InvalidInputError(f"unknown weight format {format!r}; choose one of {WEIGHT_FORMATS}")
    return _replace_weights(
        model,
        lambda name, weight, bias: layer_in_format(weight, bias, format=format),
        dtype=None,
    )


def weight_only_structure(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Shape a model built on the meta device after a quantized state dict (as
    ``linear_weights_in_format`` or a loader keeping a file's own blocks writes it), in place:
    each linear, and the token embedding, whose weight ``state_dict`` holds in a weight-only
    format becomes that format's module, still on the meta device, each in its own format;
    weights in ``dtype``, the activations' (what the embedding lookup gives), stay plain.

    Returns:
        ``state_dict`` plus the names under which a tied output head shares the embedding's
        table, ready for a strict assignment.
    """

    def stored(name: str, weight: Tensor, bias: Tensor | None) -> nn.Module | None:
        prefix = stored_prefix(name + ".weight")
        stored_weight = state_dict.get(prefix + "weight")
        if stored_weight is None or stored_weight.dtype == dtype:
            return None  # absent, or kept in the activations' dtype: a plain layer
        buffers = {
            key: torch.empty_like(state_dict[prefix + key], device="meta")
            for key in ("weight", "scale", "offset")
            if prefix + key in state_dict
        }
        packed = buffers["weight"].dim() == 3  # see pack_w8a8
        return (W8A8Linear if packed else WeightOnlyLinear)(**buffers, bias=bias)

    _replace_weights(model, stored, dtype=dtype)
    aliases = {}
    for name, module in model.named_modules(remove_duplicate=False):
        embedding = dict(module.named_children()).get("tok_embeddings")
        if isinstance(embedding, QuantizedEmbedding) and module.output is embedding.table:
            prefix = f"{name}." if name else ""
            for key, tensor in state_dict.items():
                if key.startswith(f"{prefix}tok_embeddings.table."):
                    aliases[prefix + "output." + key.rsplit(".", 1)[1]] = tensor
    return {**state_dict, **aliases}


def _replace_weights(
    model: nn.Module,
    make: Callable[[str, Tensor, Tensor | None], nn.Module | None],
    *,
    dtype: torch.dtype | None,
) -> nn.Module:
    """Replace each ``nn.Linear`` and each decoder's ``tok_embeddings`` ``nn.Embedding`` (with
    a tied head) by ``make(name, weight, bias)`` where it returns a module; the embedding's
    lookups give ``dtype`` (None: the replaced embedding's)."""
    for module_name, module in list(model.named_modules()):
        prefix = f"{module_name}." if module_name else ""
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                replacement = make(prefix + child_name, child.weight, child.bias)
                if replacement is not None:
                    setattr(module, child_name, replacement)
        embedding = dict(module.named_children()).get("tok_embeddings")
        if isinstance(embedding, nn.Embedding):
            table = make(prefix + "tok_embeddings", embedding.weight, None)
            if table is not None:
                module.tok_embeddings = QuantizedEmbedding(
                    table, dtype=dtype or embedding.weight.dtype
                )
                if isinstance(getattr(module, "output", None), TiedLinear):
                    module.output = table
    return model


__all__ = [
    "GROUP_SIZE",
    "WEIGHT_FORMATS",
    "QuantizedEmbedding",
    "W8A8Linear",
    "WeightOnlyLinear",
    "layer_in_format",
    "linear_weights_in_format",
    "pack_int4",
    "precision",
    "quantize",
    "stored_prefix",
    "unpack_int4",
    "weight_in_format",
    "weight_only_structure",
]
