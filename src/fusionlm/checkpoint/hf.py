"""transformers-format directories: ``config.json`` + safetensors (single file or sharded)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fusionlm.checkpoint.keys import KeyTable
from fusionlm.errors import InvalidInputError
from fusionlm.files import atomic_write, atomic_write_text, read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# Keys some checkpoints carry that hold no weights (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a transformers directory.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: config.json is not a JSON object.
    """
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json; is it a transformers model directory?"
        )
    return read_json_object(path)


def read_safetensors(directory: Path, *, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every tensor of the directory's safetensors file(s), keys as stored, cast to ``dtype``.

    Raises:
        FileNotFoundError: no ``model.safetensors`` nor ``model.safetensors.index.json``, or a
            shard named by the index is missing.
        ValueError: a file is truncated or corrupt.
    """
    files = _weight_files(directory)
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError) as e:
            raise InvalidInputError(
                f"cannot read {file}: {e}; the file is truncated or corrupt"
            ) from None
    return tensors


def _weight_files(directory: Path) -> list[Path]:
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidInputError(f"{index} is not a valid safetensors index: {e!r}") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(s.name) for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is missing shard(s) {missing} named in {INDEX_FILE}"
            )
        return shards
    pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
    hint = (
        f" ({pickles} are pickle files, which fusionlm never loads; convert them to safetensors)"
        if pickles
        else ""
    )
    raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def hf_to_ours(tensors: Mapping[str, Tensor], *, table: KeyTable, tied: bool) -> dict[str, Tensor]:
    """Rename a transformers state dict to our names.

    Raises:
        ValueError: keys the table does not know (listed).
    """
    kept = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    state_dict, unknown = table.rename_to_ours(kept)
    if unknown:
        raise InvalidInputError(
            f"checkpoint has tensors this architecture does not use: {sorted(unknown)[:10]}"
        )
    if tied:
        # A tied checkpoint may still store lm_head; the output reads the embedding instead.
        state_dict.pop("output.weight", None)
    return state_dict


def write_hf_dir(
    directory: Path,
    *,
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    table: KeyTable,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``extra_files`` (name -> text).

    Each file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file under a real name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    theirs = {k: v.detach().contiguous() for k, v in table.rename_to_theirs(state_dict).items()}
    atomic_write(
        directory / SINGLE_FILE, lambda tmp: save_file(theirs, tmp, metadata={"format": "pt"})
    )
    files = {
        "config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
        **(extra_files or {}),
    }
    for name, text in files.items():
        atomic_write_text(directory / name, text)
