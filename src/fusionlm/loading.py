"""Loading and saving whole models: resolve a source, read the checkpoint, build, assign weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fusionlm.checkpoint.hf import (
    LLAMA_KEYS,
    hf_to_ours,
    read_config,
    read_safetensors,
    write_hf_dir,
)
from fusionlm.models.llama import LlamaConfig, llama
from fusionlm.modules.decoder import TransformerDecoder

SUPPORTED_HF_MODEL_TYPES = ("llama",)


def load_model(
    source: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    attn_backend: str = "sdpa",
    max_seq_len: int | None = None,
) -> TransformerDecoder:
    """Load a pretrained model.

    Args:
        source: a transformers-format directory (``config.json`` + ``model.safetensors``, or
            shards with ``model.safetensors.index.json``).
        dtype: the parameters' dtype.
        attn_backend: ``"eager"``, ``"sdpa"``, ``"flex"`` or a registered backend.
        max_seq_len: override the model's context length.

    Returns:
        the model in eval mode.

    Raises:
        FileNotFoundError: the source does not exist or lacks its files.
        ValueError: an unsupported architecture, a broken config, or weights that do not fit.
    """
    path = Path(source)
    if path.is_dir():
        model = _load_hf_dir(path, dtype=dtype, attn_backend=attn_backend, max_seq_len=max_seq_len)
    elif path.exists():
        raise ValueError(
            f"{path} is not a model directory; fusionlm reads transformers directories"
        )
    else:
        raise FileNotFoundError(f"no model at {path}: expected a transformers model directory")
    return model.eval()


def _load_hf_dir(
    directory: Path, *, dtype: torch.dtype, attn_backend: str, max_seq_len: int | None
) -> TransformerDecoder:
    raw_config = read_config(directory)
    model_type = raw_config.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
        raise ValueError(
            f"{directory}: unsupported architecture model_type={model_type!r}; supported: {list(SUPPORTED_HF_MODEL_TYPES)}"
        )
    config = LlamaConfig.from_hf(raw_config)
    state_dict = hf_to_ours(
        read_safetensors(directory, dtype=dtype), table=LLAMA_KEYS, tied=config.tie_word_embeddings
    )
    model = llama(config, attn_backend=attn_backend, max_seq_len=max_seq_len, init_weights=False)
    assign_weights(model, state_dict, source=str(directory))
    return model


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
        raise ValueError(f"weights in {source} do not fit the model config: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)


def save_hf(model: TransformerDecoder, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a transformers directory that ``from_pretrained`` loads.

    Returns:
        the directory.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, LlamaConfig):
        raise ValueError("save_hf needs a model built from a LlamaConfig (model.config)")
    directory = Path(out_dir)
    dtype = next(model.parameters()).dtype
    hf_config = {**config.to_hf(), "dtype": str(dtype).removeprefix("torch.")}
    generation_config = {
        k: v
        for k, v in {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }.items()
        if v is not None
    }
    write_hf_dir(
        directory,
        state_dict=model.state_dict(),
        config=hf_config,
        table=LLAMA_KEYS,
        extra_files={"generation_config.json": json.dumps(generation_config, indent=2) + "\n"},
    )
    return directory
