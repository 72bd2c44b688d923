"""Loading and saving whole models: resolve a source, read the checkpoint, build, assign weights."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import Tensor, nn

from fusionlm.checkpoint.ggml_quants import AFFINE
from fusionlm.checkpoint.gguf import StoredTensor, read_gguf, read_gguf_config, read_gguf_metadata
from fusionlm.checkpoint.hf import (
    hf_to_ours,
    read_config,
    read_safetensors,
    write_hf_dir,
)
from fusionlm.checkpoint.keys import HF_LLAMA_KEYS
from fusionlm.errors import InvalidInputError
from fusionlm.inference.attention import BACKEND as ATTENTION_BACKEND
from fusionlm.inference.cpu_kernels import load_kernels
from fusionlm.inference.int8_activations import pack_w8a8
from fusionlm.inference.quantize import (
    linear_weights_in_format,
    quantize,
    stored_prefix,
    weight_only_structure,
)
from fusionlm.inference.weight_formats import QUANTIZATIONS
from fusionlm.models.llama import LlamaConfig, llama
from fusionlm.models.registry import DEFAULT_MODEL, MODELS, resolve
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.fusion import DeepFusionModel

if TYPE_CHECKING:
    from fusionlm.tokenizer import Tokenizer

SUPPORTED_HF_MODEL_TYPES = ("llama", "mllama", "qwen2", "qwen3")


def load_model(
    source: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    attn_backend: str | None = None,
    max_seq_len: int | None = None,
    quant: str = "none",
) -> TransformerDecoder | DeepFusionModel:
    """Load a pretrained model.

    Args:
        source: a registered name (``"smollm2-135m-instruct"``, the default), a ``.gguf``
            file, or a transformers-format directory (``config.json`` + ``model.safetensors``,
            or shards with ``model.safetensors.index.json``) of a Llama (``TransformerDecoder``)
            or an Mllama / Llama 3.2 Vision model (``DeepFusionModel``).
        dtype: the parameters' dtype (quantized GGUF tensors are dequantized to it).
        attn_backend: ``"eager"``, ``"sdpa"``, ``"flex"``, ``"sdpa_cpu"`` or a registered
            backend; None: ``"sdpa_cpu"`` (``sdpa`` with fusionlm's decode-attention
            kernel) where fusionlm's CPU kernels build, else ``"sdpa"``.
        max_seq_len: override the model's context length.
        quant: ``"none"``; ``"auto"``: a GGUF file's weights in the file's own format where a
            kernel runs it, the others in ``dtype``, all exactly as stored (a transformers
            directory: ``"none"``); or weight-only linears and token embedding that decode faster on
            CPU and compute in fp32: ``"bf16"`` (bf16 weights), ``"int8"`` (int8 weights, one
            scale per 32 inputs, as llama.cpp's Q8_0) or ``"int4"`` (4-bit weights, a scale
            and an offset per 32 inputs); or ``"w8a8"``: int8 weights whose activations are
            rounded to int8 too, per 32 inputs, computing as llama.cpp's Q8_0 files do
            (``W8A8Linear``: less precise, several times faster on a server's batch). From a
            GGUF file, int4 computes with Q4_0, Q4_1 and Q4_K tensors as stored, and int8,
            w8a8 and int4 with Q8_0 tensors (no float copy, no second rounding); other tensors
            are dequantized and converted, except that int4 refuses the finer grids of Q5_*,
            Q6_K, Q2_K and Q3_K tensors.

    Returns:
        the model in eval mode.

    Raises:
        FileNotFoundError: the source does not exist or lacks its files.
        ValueError: an unsupported architecture or format, a broken file, or weights that do
            not fit the config.
    """
    if quant not in QUANTIZATIONS:
        raise InvalidInputError(f"unknown quant {quant!r}; choose one of {list(QUANTIZATIONS)}")
    if attn_backend is None:
        attn_backend = ATTENTION_BACKEND if load_kernels() else "sdpa"
    path = model_path(source)
    if path.suffix == ".gguf":
        return _load_gguf(
            path, dtype=dtype, attn_backend=attn_backend, max_seq_len=max_seq_len, quant=quant
        ).eval()
    model = _load_hf_dir(path, dtype=dtype, attn_backend=attn_backend, max_seq_len=max_seq_len)
    if quant not in ("none", "auto"):
        quantize(model, quant)
    return model.eval()


Q = GGMLQuantizationType
STORED_FORMATS = {Q.Q4_0: "int4", Q.Q4_1: "int4", Q.Q4_K: "int4", Q.Q8_0: "int8", Q.BF16: "bf16"}
"""The GGUF tensor types a weight-only format computes with as stored, and that format."""
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


def load_tokenizer(source: str | os.PathLike[str] = DEFAULT_MODEL) -> Tokenizer:
    """The tokenizer of a registered name, a ``.gguf`` file or a transformers directory.

    Raises:
        FileNotFoundError: the source or its tokenizer files do not exist.
        ValueError: an unsupported tokenizer.
    """
    # Imported here: a process that loads only weights does without tokenizers and jinja2
    # (5 MB and 25 ms).
    from fusionlm.tokenizer import Tokenizer

    path = model_path(source)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(path))


def model_path(source: str | os.PathLike[str]) -> Path:
    """The file or directory a model source names: a registered name's file, a ``.gguf``
    file, or a transformers directory.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: something fusionlm does not read.
    """
    path = resolve(source)
    if path.is_dir() or (path.suffix == ".gguf" and path.is_file()):
        return path
    if path.exists():
        raise InvalidInputError(
            f"{path}: unsupported format; fusionlm reads .gguf files and transformers directories"
        )
    raise FileNotFoundError(
        f"no model at {path}: expected a registered name {sorted(MODELS)}, a .gguf file or a "
        "transformers directory"
    )


def _load_gguf(
    path: Path, *, dtype: torch.dtype, attn_backend: str, max_seq_len: int | None, quant: str
) -> TransformerDecoder:
    """A GGUF file's model, its weights converted to ``quant`` tensor by tensor as they are
    read: peak memory stays near the final model's size, not the float model's."""
    convert = (
        None
        if quant == "none"
        else functools.partial(_weight_only_tensor, quant=quant, dtype=dtype)
    )
    checkpoint = read_gguf(path, dtype=dtype, convert=convert)
    model = llama(
        checkpoint.config, attn_backend=attn_backend, max_seq_len=max_seq_len, init_weights=False
    )
    state_dict = checkpoint.state_dict
    if quant != "none":
        # Each layer in its own format.
        state_dict = weight_only_structure(model, state_dict, dtype=dtype)
    assign_weights(model, state_dict, source=str(path))
    return model


def _weight_only_tensor(
    name: str, stored: StoredTensor, *, quant: str, dtype: torch.dtype
) -> dict[str, Tensor]:
    """One GGUF tensor of a model loaded with ``quant``, under the names of the quantized
    model's state dict.

    A weight whose blocks a kernel computes with as stored keeps them (Q4_0, Q4_1 and Q4_K as
    int4, Q8_0 as int8, BF16 as bf16), where ``quant`` allows: ``"auto"`` all of them, int4
    the int4 and int8 ones, int8 and bf16 their own, w8a8 the int8 ones (packed). Otherwise
    ``"auto"`` dequantizes the tensor to ``dtype`` (fp32: the file's weights exactly), and the others convert it to
    ``quant``, except that int4 refuses a finer grid (Q5_*, Q6_K, Q2_K, Q3_K), which it would
    round a second time.

    Raises:
        ValueError: int4 and a tensor of such a type, named with the choices.
    """
    as_stored = STORED_FORMATS.get(stored.qtype)
    allowed = {"auto": ("int4", "int8", "bf16"), "int4": ("int4", "int8"), "w8a8": ("int8",)}
    if len(stored.shape) != 2 or not name.endswith(".weight"):
        return {name: stored.dequantize(dtype)}
    if as_stored in allowed.get(quant, (quant,)):
        buffers = _as_stored(stored, as_stored)
        if quant == "w8a8":  # Q8_0 blocks, packed
            buffers = pack_w8a8(buffers["weight"], buffers["scale"])
        return {stored_prefix(name) + key: t for key, t in buffers.items()}
    if quant == "auto":
        return {name: stored.dequantize(dtype)}
    if quant == "int4" and stored.qtype not in FLOAT_TYPES:
        raise InvalidInputError(
            f"tensor {name} is {stored.qtype.name}, which int4 does not run as stored (it runs "
            "Q4_0, Q4_1 and Q4_K blocks, and Q8_0 as int8) and would round a second time; "
            "load this file with quant 'auto' (such tensors in fp32), 'int8' or 'none'"
        )
    return linear_weights_in_format(name, stored.dequantize(dtype), format=quant)


def _as_stored(stored: StoredTensor, format: str) -> dict[str, Tensor]:
    """A GGUF weight's blocks as a ``WeightOnlyLinear`` of ``format`` holds them, unrounded."""
    if format == "bf16":
        return {"weight": stored.dequantize(torch.bfloat16)}
    rows = stored.shape[0]
    values, scale, offset = AFFINE[stored.qtype](
        stored.blocks.reshape(-1, GGML_QUANT_SIZES[stored.qtype][1])
    )
    buffers = {"weight": values.reshape(rows, -1), "scale": scale.reshape(rows, -1)}
    if offset is not None:  # 4-bit values, packed as int4 layers hold them
        buffers["offset"] = offset.reshape(rows, -1)
    return buffers


def _load_hf_dir(
    directory: Path, *, dtype: torch.dtype, attn_backend: str, max_seq_len: int | None
) -> TransformerDecoder | DeepFusionModel:
    raw_config = read_config(directory)
    if _model_type(directory, raw_config) == "mllama":
        # Imported here: the vision families' modules are not needed to load a text model.
        from fusionlm.checkpoint.mllama import read_mllama_dir
        from fusionlm.models.mllama import llama3_2_vision

        vision_config, state_dict = read_mllama_dir(directory, dtype=dtype)
        model = llama3_2_vision(
            vision_config, attn_backend=attn_backend, max_seq_len=max_seq_len, init_weights=False
        )
    else:
        config = LlamaConfig.from_hf(raw_config)
        state_dict = hf_to_ours(
            read_safetensors(directory, dtype=dtype),
            table=HF_LLAMA_KEYS,
            tied=config.tie_word_embeddings,
        )
        model = llama(
            config, attn_backend=attn_backend, max_seq_len=max_seq_len, init_weights=False
        )
    assign_weights(model, state_dict, source=str(directory))
    return model


def _model_type(directory: Path, raw_config: Mapping[str, object]) -> str:
    """``config.json``'s ``model_type``, one of ``SUPPORTED_HF_MODEL_TYPES``."""
    model_type = raw_config.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise InvalidInputError(
            f"{directory}: unsupported architecture model_type={model_type!r}; supported: "
            f"{list(SUPPORTED_HF_MODEL_TYPES)}"
        )
    return str(model_type)


def assign_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Give ``model`` (possibly on the meta device) the tensors of ``state_dict``, strictly.

    Raises:
        ValueError: missing, unexpected or wrongly shaped tensors, each listed by key.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if mismatched:
        problems.append(f"shape mismatch {mismatched[:10]}{' ...' if len(mismatched) > 10 else ''}")
    if problems:
        raise InvalidInputError(
            f"weights in {source} do not fit the model config: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=True)


def save_hf(
    model: TransformerDecoder,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a transformers directory.

    Writes config.json, model.safetensors, generation_config.json and, with a tokenizer,
    tokenizer.json, tokenizer_config.json (with the chat template) and
    special_tokens_map.json; ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it.

    Returns:
        the directory.
    """
    config = model.config
    if not isinstance(config, LlamaConfig):
        raise InvalidInputError("save_hf needs a model built from a LlamaConfig (model.config)")
    directory = Path(out_dir)
    dtype = next(model.parameters()).dtype
    hf_config = {**config.to_hf(), "dtype": str(dtype).removeprefix("torch.")}
    eos = (
        sorted(tokenizer.stop_ids)
        if tokenizer is not None and tokenizer.stop_ids
        else config.eos_token_id
    )
    generation_config = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": config.pad_token_id,
    }
    write_hf_dir(
        directory,
        state_dict=model.state_dict(),
        config=hf_config,
        table=HF_LLAMA_KEYS,
        extra_files={
            "generation_config.json": json.dumps(
                {k: v for k, v in generation_config.items() if v is not None}, indent=2
            )
            + "\n"
        },
    )
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def _tokenizer_kind(directory: Path) -> str:
    """The model kind of a transformers directory's ``tokenizer.json`` (``BPE``, ...)."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        return "none (no tokenizer.json)"
    try:
        kind = json.loads(file.read_text(encoding="utf-8")).get("model", {}).get("type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return "tokenizer.json (unreadable)"
    return f"tokenizer.json ({kind or 'unknown model type'})"


def describe(source: str | os.PathLike[str] = DEFAULT_MODEL) -> dict[str, str]:
    """What a model source holds, read from its headers without loading weights.

    Returns:
        ordered fields: source, format, architecture (the file's own name for it, with its
        shape), tokenizer, parameters, dtype, context, quantization, file size.
    """
    path = model_path(source)
    parts = ""
    if path.suffix == ".gguf":
        config, quantization = read_gguf_config(path)
        metadata = read_gguf_metadata(path)
        arch = metadata["general.architecture"]
        tokenizer = (
            f"{metadata.get('tokenizer.ggml.model', 'none')} "
            f"(pre-tokenizer {metadata.get('tokenizer.ggml.pre', 'default')}), "
            f"{len(metadata.get('tokenizer.ggml.tokens', []))} tokens"
        )
        files, fmt = [path], "gguf"
        native = STORED_FORMATS.get(getattr(Q, quantization, None))
        dtype = (
            f"{quantization} as {native} weights, as stored (--quant auto); fp32 with --quant none"
            if native
            else "per tensor, dequantized at load"
        )
        model = llama(config, init_weights=False)
    else:
        raw = read_config(path)
        arch = str(raw.get("model_type", "llama"))
        tokenizer = _tokenizer_kind(path)
        files = sorted(path.glob("*.safetensors"))
        fmt, quantization = "transformers directory (safetensors)", "none"
        dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "unknown")
        if _model_type(path, raw) == "mllama":
            from fusionlm.checkpoint.mllama import read_mllama_config
            from fusionlm.models.mllama import llama3_2_vision

            vision_config = read_mllama_config(path)
            config = vision_config.text
            parts = (
                f" + {len(vision_config.cross_attention_layers)} cross-attention layers and a "
                f"{vision_config.vision.num_hidden_layers}+{vision_config.vision.num_global_layers}"
                "-layer image encoder (mllama)"
            )
            model = llama3_2_vision(vision_config, init_weights=False)
        else:
            config = LlamaConfig.from_hf(raw)
            model = llama(config, init_weights=False)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "source": str(path),
        "format": fmt,
        "architecture": (
            f"{arch}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads ({config.num_key_value_heads} kv), vocab "
            f"{config.vocab_size}{parts}"
        ),
        "tokenizer": tokenizer,
        "parameters": f"{parameters / 1e6:.1f} M",
        "dtype": dtype,
        "context": f"{config.max_position_embeddings} tokens (rope {config.rope_type}, theta {config.rope_theta:g})",
        "quantization": quantization,
        "file size": f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB",
    }
