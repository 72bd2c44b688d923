"""GGUF files (llama.cpp): metadata, config and dequantized weights in transformers' layout.

The header is parsed here with ``struct`` over a memory map; the ``gguf`` package supplies the
format's constants. ``gguf.GGUFReader`` builds a numpy view per string and takes ~2.5 s on the
49k-token vocabulary of SmolLM2 before touching a weight, which alone would exceed our load budget.
Dequantization uses the torch kernels of ``ggml_quants.py``, which mirror ``gguf.quants`` op by op (results
are bit-identical to it), in bounded chunks; they are about twice as fast as ``gguf.quants``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import mmap
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from torch import Tensor

from fusionlm.checkpoint.ggml_quants import DEQUANTIZERS
from fusionlm.checkpoint.keys import GGUF_LLAMA_KEYS
from fusionlm.errors import InvalidInputError
from fusionlm.models.llama import LlamaConfig

__all__ = [
    "LONG_ARRAY_ITEMS",
    "GGUFCheckpoint",
    "LongArray",
    "StoredTensor",
    "read_gguf",
    "read_gguf_config",
    "read_gguf_metadata",
]

Q = GGMLQuantizationType

ARCHITECTURES = ("llama", "mistral3", "qwen2", "qwen3")
"""The ``general.architecture`` values read here: Llama's blocks; Q/K/V biases in qwen2;
per-head query and key norms in qwen3; mistral3 (Ministral 3, Mistral Small 3.1) is Llama's
graph unless its file sets an attention temperature scale, which is refused."""
PERMUTED_QK = ("llama", "mistral3")
"""Architectures whose converter interleaves Q and K rows for llama.cpp's RoPE (undone here);
qwen2's and qwen3's use the NeoX RoPE, transformers' own layout."""


# llama.cpp's Llama-3 RoPE scaling: per-frequency divisors, not a learned weight.
_ROPE_FREQS = "rope_freqs.weight"


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF file read into fusionlm's terms.

    Attributes:
        config: the architecture, from the ``llama.*`` metadata.
        state_dict: our parameter names -> tensors in transformers' layout (``[out, in]``
            linears, rotate-half Q/K), dequantized to the requested dtype. ``output.weight``
            only when the file has its own (untied) output matrix.
        metadata: every key/value field, decoded to Python values, but arrays of more than
            ``LONG_ARRAY_ITEMS`` items (a vocabulary) as ``LongArray``: ``read_gguf_metadata``
            reads them.
        quantization: the most common tensor type among the 2-D weights, e.g. ``"Q4_1"``.
    """

    config: LlamaConfig
    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]
    quantization: str


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file, without reading tensor data.

    FLOAT32 scalars become the shortest decimal that round-trips (``1e-05``, not
    ``9.99999974e-06``); arrays become lists.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, or a truncated or corrupt one.
    """
    metadata = _header(path).metadata
    long_arrays = {k: v for k, v in metadata.items() if isinstance(v, LongArray)}
    if not long_arrays:
        return metadata
    with _mapped(path) as buf:
        parser = _Parser(buf, Path(path))
        return metadata | {key: parser.array_at(array) for key, array in long_arrays.items()}


def read_gguf_config(path: Path) -> tuple[LlamaConfig, str]:
    """The architecture and the quantization name of a GGUF file, without reading weights.

    Raises:
        the errors of ``read_gguf`` that the header alone can show.
    """
    header = _header(path)
    with _mapped(path) as buf:
        tensors = {t.name: t for t in header.tensors}
        return _config(header.metadata, tensors, buf=buf, path=path), _quantization(
            tensors.values()
        )


def read_gguf(
    path: Path,
    *,
    dtype: torch.dtype,
    convert: Callable[[str, StoredTensor], dict[str, Tensor]] | None = None,
) -> GGUFCheckpoint:
    """Read a GGUF file of one of ``ARCHITECTURES`` (Llama's blocks).

    Args:
        path: the ``.gguf`` file.
        dtype: the floating dtype of the returned tensors.
        convert: called with each tensor (our name, and the tensor as stored) as soon as it is
            read; what it returns goes into the state dict in its place (by default
            ``{name: stored.dequantize(dtype)}``). A loader that quantizes converts tensor by
            tensor, never holding the whole float model, and may keep the file's own blocks.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a valid GGUF file (truncated or corrupt), another architecture, a missing
            required metadata key, an unsupported tensor type or RoPE scaling, or tensors a Llama
            does not have (listed).
    """
    if not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating type, got {dtype}")
    header = _header(path)
    with _mapped(path) as buf:
        tensors = {t.name: t for t in header.tensors}
        config = _config(header.metadata, tensors, buf=buf, path=path)
        _check_names(tensors, path=path)
        _check_types(tensors.values(), path=path)
        workers = torch.get_num_threads()
        convert = convert or functools.partial(_dequantized, dtype=dtype)
        permuted = header.metadata["general.architecture"] in PERMUTED_QK  # checked by _config

        with _one_torch_thread(), ThreadPoolExecutor(workers) as pool:
            loading = {}
            for info in tensors.values():
                if info.name == _ROPE_FREQS:
                    continue
                ours = GGUF_LLAMA_KEYS.to_ours(info.name)
                assert ours is not None  # _check_names
                loading[ours] = pool.submit(
                    _read_tensor,
                    buf,
                    info,
                    ours,
                    config=config,
                    permuted=permuted,
                    convert=convert,
                )
            state_dict = {k: v for future in loading.values() for k, v in future.result().items()}
    return GGUFCheckpoint(
        config=config,
        state_dict=state_dict,
        metadata=header.metadata,
        quantization=_quantization(tensors.values()),
    )


# --------------------------------------------------------------------------- file parsing


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists ne0, the contiguous dim, first)
    qtype: GGMLQuantizationType
    offset: int  # absolute, in bytes
    nbytes: int


@dataclasses.dataclass(frozen=True)
class LongArray:
    """A metadata array of more than ``LONG_ARRAY_ITEMS`` items (a vocabulary, its merges),
    left unread in the header: loading the weights needs only its length, the tokenizer reads
    it (``read_gguf_metadata``). The default model's three take 37 ms and ~10 MB to parse."""

    offset: int  # of the array's item type, in bytes
    length: int

    def __len__(self) -> int:
        return self.length


LONG_ARRAY_ITEMS = 1024


@dataclasses.dataclass(frozen=True)
class _Header:
    metadata: dict[str, Any]  # long arrays as ``LongArray``
    tensors: list[_TensorInfo]


def _header(path: Path) -> _Header:
    """The parsed header of ``path`` (metadata and tensor table), parsed once per version of
    the file: loading a model and then its tokenizer reads the header twice. Shared between
    callers: read-only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = path.stat()
    return _parsed_header(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _parsed_header(path: Path, mtime_ns: int, size: int) -> _Header:
    with _mapped(path) as buf:
        return _Parser(buf, path).header(with_tensors=True)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[mmap.mmap]:
    """``path`` memory-mapped copy-on-write: never written back, but writable so torch can view it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as e:  # an empty file cannot be mapped
            raise _corrupt(path, str(e)) from None
    try:
        yield buf
    finally:
        # While an exception's traceback still holds a tensor view, close() refuses; the map is
        # then released with the view.
        with contextlib.suppress(BufferError):
            buf.close()


def _corrupt(path: Path, why: str) -> ValueError:
    return InvalidInputError(f"{path} is not a valid GGUF file (truncated or corrupt?): {why}")


_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype[Any]] = {
    vtype: np.dtype(fmt) for vtype, fmt in _SCALARS.items()
}


class _Parser:
    """Sequential little-endian reader of a GGUF v2/v3 header."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def header(self, *, with_tensors: bool) -> _Header:
        try:
            return self._header(with_tensors=with_tensors)
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise _corrupt(self.path, str(e) or type(e).__name__) from None

    def _header(self, *, with_tensors: bool) -> _Header:
        if len(self.buf) < 24:
            raise InvalidInputError(f"only {len(self.buf)} bytes, shorter than a GGUF header")
        if self._scalar("<I") != GGUF_MAGIC:
            raise InvalidInputError("bad magic (a GGUF file starts with b'GGUF')")
        version = self._scalar("<I")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = "big-endian files are not supported" if swapped in (2, 3) else ""
            raise InvalidInputError(f"unsupported GGUF version {version} {why}".strip())
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(GGUFValueType(self._scalar("<I")), top_level=True)
        if not with_tensors:
            return _Header(metadata, [])
        raw = [self._tensor_info() for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise InvalidInputError(f"general.alignment is {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        tensors = []
        for name, shape, qtype, offset in raw:
            info = _TensorInfo(name, shape, qtype, data_start + offset, _nbytes(shape, qtype))
            if info.offset + info.nbytes > len(self.buf):
                raise InvalidInputError(
                    f"tensor {name!r} ends at byte {info.offset + info.nbytes} "
                    f"but the file has {len(self.buf)}"
                )
            tensors.append(info)
        return _Header(metadata, tensors)

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType | int, int]:
        name = self._string()
        n_dims = self._scalar("<I")
        if n_dims > 4:
            raise InvalidInputError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 4)")
        dims = [self._scalar("<Q") for _ in range(n_dims)]
        type_id = self._scalar("<I")
        qtype = Q(type_id) if type_id in Q._value2member_map_ else type_id
        return name, tuple(reversed(dims)), qtype, self._scalar("<Q")

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("<Q")
        if self.pos + n > len(self.buf):
            raise InvalidInputError(f"a string of {n} bytes runs past the end of the file")
        text = self.buf[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def array_at(self, array: LongArray) -> list[Any]:
        """The items of a ``LongArray`` of this file."""
        self.pos = array.offset
        try:
            return self._array()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise _corrupt(self.path, str(e) or type(e).__name__) from None

    def _value(self, vtype: GGUFValueType, *, top_level: bool = False) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            return self._long_array() if top_level else self._array()
        value = self._scalar(_SCALARS[vtype])
        if vtype == GGUFValueType.FLOAT32 and top_level:
            # The shortest decimal that maps to the same float32, so configs show 1e-05.
            return float(str(np.float32(value)))
        return value

    def _array(self) -> list[Any]:
        item_type = GGUFValueType(self._scalar("<I"))
        n = self._scalar("<Q")
        if item_type in _ARRAY_DTYPES:
            dtype = _ARRAY_DTYPES[item_type]
            if self.pos + n * dtype.itemsize > len(self.buf):
                raise InvalidInputError(f"an array of {n} items runs past the end of the file")
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos += n * dtype.itemsize
            return values
        if item_type == GGUFValueType.STRING:
            return self._strings(n)
        return [self._value(item_type) for _ in range(n)]

    def _long_array(self) -> list[Any] | LongArray:
        """An array, or past it as a ``LongArray`` if it is long and of numbers or strings
        (whose byte lengths are checked against the file all the same)."""
        offset = self.pos
        item_type = GGUFValueType(self._scalar("<I"))
        n = self._scalar("<Q")
        if n <= LONG_ARRAY_ITEMS or item_type not in (*_ARRAY_DTYPES, GGUFValueType.STRING):
            self.pos = offset
            return self._array()
        if item_type == GGUFValueType.STRING:
            length, end = struct.Struct("<Q").unpack_from, len(self.buf)
            pos = self.pos
            for _ in range(n):
                pos += 8 + length(self.buf, pos)[0]
                if pos > end:
                    raise InvalidInputError("a string runs past the end of the file")
            self.pos = pos
        else:
            self.pos += n * _ARRAY_DTYPES[item_type].itemsize
            if self.pos > len(self.buf):
                raise InvalidInputError(f"an array of {n} items runs past the end of the file")
        return LongArray(offset, n)

    def _strings(self, n: int) -> list[str]:
        """``n`` strings in a row (a vocabulary: 50-250k of them), in one tight loop."""
        buf, pos, end, strings = self.buf, self.pos, len(self.buf), []
        length, append = struct.Struct("<Q").unpack_from, strings.append
        for _ in range(n):
            (size,) = length(buf, pos)
            pos += 8
            if pos + size > end:
                raise InvalidInputError(f"a string of {size} bytes runs past the end of the file")
            append(buf[pos : pos + size].decode("utf-8"))
            pos += size
        self.pos = pos
        return strings


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType | int) -> int:
    if qtype not in GGML_QUANT_SIZES:
        return 0  # read_gguf rejects unknown types by name (_check_types)
    block, size = GGML_QUANT_SIZES[qtype]
    numel = math.prod(shape)
    if shape and shape[-1] % block:
        raise InvalidInputError(f"a row of {shape[-1]} is not a multiple of the {qtype.name} block")
    return numel // block * size


# --------------------------------------------------------------------------- config


def _config(
    metadata: Mapping[str, Any], tensors: Mapping[str, _TensorInfo], *, buf: mmap.mmap, path: Path
) -> LlamaConfig:
    arch = _require(metadata, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise InvalidInputError(
            f"{path}: unsupported general.architecture {arch!r}; fusionlm reads "
            f"{', '.join(repr(a) for a in ARCHITECTURES)} GGUF files"
        )
    metadata = _as_llama_keys(metadata, arch)
    if metadata.get("llama.attention.temperature_scale", 0):
        raise InvalidInputError(
            f"{path}: {arch}.attention.temperature_scale="
            f"{metadata['llama.attention.temperature_scale']} (Llama 4 attention temperature "
            "tuning) is not supported"
        )
    if metadata.get("llama.expert_count", 0):
        raise InvalidInputError(
            f"{path}: a mixture-of-experts llama (llama.expert_count="
            f"{metadata['llama.expert_count']}) is not supported"
        )

    def get(key: str, default: Any = None) -> Any:
        if default is None:
            return _require(metadata, f"llama.{key}", path)
        return metadata.get(f"llama.{key}", default)

    def count(key: str, value: Any) -> int:
        """``value`` of ``llama.{key}``, which must be a positive integer."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{path}: llama.{key} is {value!r}, not a positive integer")
        return value

    def number(key: str, default: Any = None) -> float:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"{path}: llama.{key} is {value!r}, not a number")
        return float(value)

    hidden = count("embedding_length", get("embedding_length"))
    heads = get("attention.head_count")
    kv_heads = _same_per_layer(get("attention.head_count_kv", heads), "head_count_kv", path)
    kv_heads = count("attention.head_count_kv", kv_heads)
    heads = count("attention.head_count", _same_per_layer(heads, "head_count", path))
    head_dim = metadata.get("llama.attention.key_length") or metadata.get(
        "llama.rope.dimension_count", hidden // heads
    )
    head_dim = count("attention.key_length", head_dim)
    if "llama.vocab_size" in metadata:
        vocab_size = count("vocab_size", metadata["llama.vocab_size"])
    elif isinstance(metadata.get("tokenizer.ggml.tokens"), list | LongArray):
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    else:
        raise InvalidInputError(
            f"{path}: metadata has neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens'; "
            "cannot tell the vocabulary size"
        )
    rope_type, rope_params = _rope_scaling(metadata, tensors, buf=buf, head_dim=head_dim, path=path)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=count("feed_forward_length", get("feed_forward_length")),
        num_hidden_layers=count("block_count", get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=count("context_length", get("context_length")),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
        rope_theta=number("rope.freq_base", 10_000.0),
        rope_type=rope_type,
        rope_params=rope_params,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        attention_output_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_gate.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )


def _as_llama_keys(metadata: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """``metadata`` with the architecture's keys (``qwen2.block_count``) under Llama's names
    (``llama.block_count``): the architectures read here share Llama's hyperparameters."""
    prefix = f"{arch}."
    return {
        f"llama.{key.removeprefix(prefix)}" if key.startswith(prefix) else key: value
        for key, value in metadata.items()
    }


def _require(metadata: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise InvalidInputError(
            f"{path}: required metadata key {key!r} is missing; the file was not written by a "
            "llama converter, or is damaged"
        )
    return metadata[key]


def _same_per_layer(value: int | list[int], key: str, path: Path) -> int:
    # Newer converters may store a per-layer list; a Llama has the same count in every layer.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise InvalidInputError(
                f"{path}: per-layer llama.attention.{key} {value} is not supported"
            )
        return value[0]
    return value


def _rope_scaling(
    metadata: Mapping[str, Any],
    tensors: Mapping[str, _TensorInfo],
    *,
    buf: mmap.mmap,
    head_dim: int,
    path: Path,
) -> tuple[str, dict[str, Any]]:
    """(transformers rope_type, its params) from ``llama.rope.scaling.*`` or ``rope_freqs``."""
    kind = metadata.get("llama.rope.scaling.type", "none")
    factor = metadata.get("llama.rope.scaling.factor")
    if kind == "none" and metadata.get("llama.rope.scale_linear", 1.0) != 1.0:
        kind, factor = "linear", metadata["llama.rope.scale_linear"]  # pre-2024 files
    if _ROPE_FREQS in tensors:
        if kind != "none":
            raise InvalidInputError(f"{path}: rope_freqs.weight together with {kind} scaling")
        _check_types([tensors[_ROPE_FREQS]], path=path)
        (factors,) = _read_tensor(
            buf,
            tensors[_ROPE_FREQS],
            _ROPE_FREQS,
            config=None,
            convert=functools.partial(_dequantized, dtype=torch.float64),
        ).values()
        theta = float(metadata.get("llama.rope.freq_base", 10_000.0))
        return _llama3_rope(factors, theta=theta, head_dim=head_dim, path=path)
    if kind == "none":
        return "default", {}
    if kind == "linear":
        return "linear", {"factor": _scaling_factor(factor, kind, path)}
    if kind == "yarn":
        for key in ("attn_factor", "yarn_log_multiplier"):
            value = metadata.get(f"llama.rope.scaling.{key}")
            if value not in (None, 0.0, 1.0):
                raise InvalidInputError(
                    f"{path}: yarn with llama.rope.scaling.{key}={value} is unsupported"
                )
        params: dict[str, Any] = {"factor": _scaling_factor(factor, kind, path)}
        original = metadata.get("llama.rope.scaling.original_context_length")
        if original is not None:
            params["original_max_position_embeddings"] = original
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if f"llama.rope.scaling.{theirs}" in metadata:
                params[ours] = metadata[f"llama.rope.scaling.{theirs}"]
        return "yarn", params
    raise InvalidInputError(
        f"{path}: unsupported llama.rope.scaling.type {kind!r}; supported: none, linear, yarn"
    )


def _scaling_factor(factor: float | None, kind: str, path: Path) -> float:
    if factor is None:
        raise InvalidInputError(f"{path}: {kind} RoPE scaling without 'llama.rope.scaling.factor'")
    return float(factor)


def _llama3_rope(
    factors: Tensor, *, theta: float, head_dim: int, path: Path
) -> tuple[str, dict[str, Any]]:
    """Recover transformers' ``llama3`` parameters from llama.cpp's per-frequency divisors.

    The divisors depend on (context, low, high) only through context/(high-low) and
    low/(high-low), so we fix ``low_freq_factor = 1`` (every released Llama 3.x) and fit the
    rest from the interpolated band; the fit is accepted only if it reproduces every divisor.

    Raises:
        ValueError: the divisors do not follow the llama3 formula (then we cannot map them).
    """
    if factors.shape != (head_dim // 2,):
        raise InvalidInputError(f"{path}: rope_freqs.weight has shape {tuple(factors.shape)}")
    if torch.all(factors == 1):
        return "default", {}
    factor = float(factors.max())
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    inv_wavelen = freqs / (2 * math.pi)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    unsupported = InvalidInputError(
        f"{path}: rope_freqs.weight does not follow llama3 RoPE scaling with recoverable "
        "parameters; this per-frequency scaling is unsupported"
    )
    if int(band.sum()) < 2:
        raise unsupported
    # smooth = context/(high-low) * 1/wavelen - low/(high-low), from 1/f = (1-smooth)/factor + smooth
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    x = torch.stack([inv_wavelen[band], -torch.ones_like(smooth)], dim=1)
    slope, intercept = torch.linalg.lstsq(x, smooth.unsqueeze(1)).solution.squeeze(1).tolist()
    if intercept <= 0:
        raise unsupported
    high = float(f"{1 + 1 / intercept:.6g}")
    params = {
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": round(slope / intercept),
    }
    if not torch.allclose(_llama3_factors(freqs, **params), factors, rtol=1e-5, atol=0):
        raise unsupported
    return "llama3", params


def _llama3_factors(
    freqs: Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """llama.cpp's ``rope_freqs`` for the given llama3 parameters (convert_hf_to_gguf.py)."""
    context = original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > context / low_freq_factor, factor, interpolated)
    return torch.where(wavelen < context / high_freq_factor, 1.0, out)


def _check_names(tensors: Mapping[str, _TensorInfo], *, path: Path) -> None:
    unknown = sorted(
        name for name in tensors if name != _ROPE_FREQS and GGUF_LLAMA_KEYS.to_ours(name) is None
    )
    if unknown:
        raise InvalidInputError(
            f"{path}: tensors a llama does not have: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}"
        )


def _check_types(tensors: Iterable[_TensorInfo], *, path: Path) -> None:
    for info in tensors:
        if info.qtype not in DEQUANTIZERS:
            raise InvalidInputError(
                f"{path}: tensor {info.name!r} has type {_type_name(info.qtype)}, which fusionlm cannot "
                f"dequantize; supported: {[t.name for t in DEQUANTIZERS]}. Re-quantize the model "
                "to one of these (e.g. Q4_K_M or Q8_0 with llama-quantize)"
            )


def _quantization(tensors: Iterable[_TensorInfo]) -> str:
    counts = collections.Counter(_type_name(t.qtype) for t in tensors if len(t.shape) == 2)
    return counts.most_common(1)[0][0] if counts else "F32"


def _type_name(qtype: GGMLQuantizationType | int) -> str:
    return qtype.name if isinstance(qtype, GGMLQuantizationType) else f"type id {qtype}"


def _permuted_heads(ours: str, config: LlamaConfig) -> int | None:
    if ".attn.q_proj." in ours:
        return config.num_attention_heads
    if ".attn.k_proj." in ours:
        return config.num_key_value_heads
    return None


# --------------------------------------------------------------------------- tensors

_CHUNK_BLOCKS = 1 << 15  # bounds the float32 temporaries of a quantized tensor to a few MB


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch ops single-threaded for the duration.

    Dequantization is thousands of short, memory-bound ops. With intra-op threads, each op ends
    in a barrier, and when another process holds a core a barrier waits out a scheduler slice:
    on 2 shared cores SmolLM2 took 1.5-10 s instead of 0.4 s; one thread takes 0.5-0.7 s always.
    ``read_gguf`` uses the cores by dequantizing whole tensors side by side instead (threads
    that never wait on each other).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor as the file stores it, rows in transformers' order (llama.cpp's Q/K row
    interleaving undone).

    Attributes:
        qtype: the GGML type.
        shape: ``[out, in]`` (or ``[n]``).
        blocks: uint8 ``[rows, bytes per row]``; valid only during ``read_gguf``'s ``convert``
            call (it may be a view of the memory-mapped file): copy what you keep.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    blocks: Tensor = dataclasses.field(repr=False)  # reading it after the map closes would crash

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The values ``[*shape]`` in ``dtype`` (a fresh tensor), bit-identical to
        ``gguf.quants.dequantize`` rounded to ``dtype``."""
        kernel = DEQUANTIZERS[self.qtype]
        block, size = GGML_QUANT_SIZES[self.qtype]
        blocks = self.blocks.reshape(-1, size)
        out = torch.empty(blocks.shape[0], block, dtype=dtype)
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start : start + _CHUNK_BLOCKS] = kernel(blocks[start : start + _CHUNK_BLOCKS])
        return out.view(self.shape)


def _dequantized(name: str, stored: StoredTensor, *, dtype: torch.dtype) -> dict[str, Tensor]:
    """``read_gguf``'s default conversion: the tensor dequantized to ``dtype``."""
    return {name: stored.dequantize(dtype)}


def _read_tensor(
    buf: mmap.mmap,
    info: _TensorInfo,
    ours: str,
    *,
    config: LlamaConfig | None,
    convert: Callable[[str, StoredTensor], dict[str, Tensor]],
    permuted: bool = False,
) -> dict[str, Tensor]:
    """One tensor of the file under our name, through ``convert``.

    Rows are independent in every GGML type, so undoing llama.cpp's Q/K row interleaving moves
    raw bytes (cheaper than moving floats): it stored row (h, i, p) where transformers has
    (h, p, i).
    """
    if 0 in info.shape:
        raise InvalidInputError(f"tensor {info.name!r} has an empty dimension: {info.shape}")
    rows = math.prod(info.shape[:-1])
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
    raw = raw.view(rows, -1)
    heads = _permuted_heads(ours, config) if permuted and config is not None else None
    if heads is not None:
        if len(info.shape) != 2 or rows != heads * config.head_dim:
            raise InvalidInputError(
                f"tensor {info.name!r} has shape {info.shape}; the file's config needs "
                f"{heads} heads of {config.head_dim} rows"
            )
        raw = raw.view(heads, -1, 2, raw.shape[-1]).transpose(1, 2).reshape(rows, -1)
    converted = convert(ours, StoredTensor(qtype=info.qtype, shape=info.shape, blocks=raw))
    _release_pages(buf, info)
    return converted


def _release_pages(buf: mmap.mmap, info: _TensorInfo) -> None:
    """Drop a converted tensor's pages of the file from the process's memory. Read pages of a
    map count as the process's own until it is closed: without this, loading the default model
    peaked ~85 MB (the file) above the loaded model. The map is never written, so a page still
    needed (one shared with the next tensor) is read again from the file."""
    if info.nbytes and hasattr(mmap, "MADV_DONTNEED"):
        start = info.offset - info.offset % mmap.PAGESIZE
        buf.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
