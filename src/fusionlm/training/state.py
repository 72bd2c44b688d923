"""Resumable training checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``checkpoints/step_NNNNNNNN/`` holding

- ``model.safetensors``: the trainable parameters, full (unsharded), our names;
- ``optimizer.safetensors``: the optimizer's per-parameter tensors (``NAME/exp_avg`` ...);
- ``rng.safetensors``: every process's CPU (and CUDA) generator state;
- ``state.json``: the step, the optimizer's groups and scalars, the scheduler, and a
  fingerprint of the model and data it belongs to.

It is written into a temporary directory that is renamed into place, and only then does the
``checkpoints/latest`` file (itself replaced atomically) point at it: a crash at any moment
leaves the previous checkpoint whole and ``latest`` naming it. Nothing is ever read with
``pickle``/``torch.load``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fusionlm.errors import InvalidInputError
from fusionlm.files import atomic_write_text
from fusionlm.training.distributed import DistributedEnv, barrier, gather_to_main

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def checkpoint_root(output_dir: str | os.PathLike[str]) -> Path:
    return Path(output_dir) / CHECKPOINTS


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The directory ``checkpoints/latest`` names, or None when there is no checkpoint.

    Raises:
        ValueError: ``latest`` names a directory that does not exist.
    """
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise InvalidInputError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: Mapping[str, Any],
    env: DistributedEnv,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of ``step`` (every process must call; the main one writes).

    Returns:
        the checkpoint directory.
    """
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng = {f"cpu/{r}": t for r, t in enumerate(gather_to_main(torch.get_rng_state(), env))}
    if env.device.type == "cuda":
        states = gather_to_main(torch.cuda.get_rng_state(env.device), env)
        rng.update({f"cuda/{r}": t for r, t in enumerate(states)})
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors, scalars = _flatten_optimizer_state(optim_sd["state"])
        state = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": env.world_size,
            "fingerprint": dict(fingerprint),
            "optimizer": {"param_groups": optim_sd["param_groups"], "scalars": scalars},
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        }
        save_file(_contiguous(model_sd), str(tmp / "model.safetensors"))
        save_file(_contiguous(tensors), str(tmp / "optimizer.safetensors"))
        save_file(_contiguous(rng), str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        if final.exists():  # left by a run that crashed before pointing `latest` at it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep=keep, current=final)
    barrier(env)
    return final


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    env: DistributedEnv,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from the checkpoint at ``path``.

    Call ``read_state`` and check the fingerprint first. Returns the ``state.json`` contents.

    Raises:
        ValueError: unreadable files or tensors that do not fit.
    """
    state = read_state(path)
    try:
        model_sd = load_file(str(path / "model.safetensors"))
        optim_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError) as e:
        raise InvalidInputError(f"checkpoint {path} is unreadable: {e}") from None
    set_model_state_dict(
        model, model_sd, options=StateDictOptions(full_state_dict=True, strict=False)
    )
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group
        for group in state["optimizer"]["param_groups"]
    ]
    optim_sd = {
        "state": _unflatten_optimizer_state(optim_tensors, state["optimizer"]["scalars"]),
        "param_groups": groups,
    }
    set_optimizer_state_dict(
        model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True)
    )
    scheduler.load_state_dict(
        {**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    rank = env.rank if f"cpu/{env.rank}" in rng else 0
    torch.set_rng_state(rng[f"cpu/{rank}"])
    if env.device.type == "cuda" and f"cuda/{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda/{rank}"], env.device)
    return state


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint directory.

    Raises:
        ValueError: missing or malformed, or written by an incompatible version.
    """
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"checkpoint {path} has no readable state.json: {e}") from None
    if state.get("format") != FORMAT_VERSION:
        raise InvalidInputError(
            f"checkpoint {path} has format {state.get('format')}, expected {FORMAT_VERSION}"
        )
    return state


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: Path) -> None:
    """Refuse to resume from a checkpoint of another model, adapter setup or dataset.

    Raises:
        ValueError: naming what differs.
    """
    differences = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sub[:4])
            differences.append(f"{key} ({detail}{' ...' if len(sub) > 4 else ''})")
        else:
            differences.append(f"{key} ({a!r} vs {b!r})")
    if differences:
        raise InvalidInputError(
            f"cannot resume from {path}: it was written for a different run; differs in "
            + "; ".join(differences)
            + " (checkpoint vs now)"
        )


def _contiguous(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _flatten_optimizer_state(
    state: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    tensors, scalars = {}, {}
    for name, entries in state.items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, scalars


def _unflatten_optimizer_state(
    tensors: Mapping[str, Tensor], scalars: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in scalars.items()}
    for flat, tensor in tensors.items():
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = tensor
    return state


def _prune(root: Path, *, keep: int, current: Path) -> None:
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p != current)
    # Newer ones were left by a run that crashed after the step `latest` named; stale now.
    newer = [p for p in steps if p.name > current.name]
    older = [p for p in steps if p.name < current.name]
    for old in newer + older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "check_fingerprint",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
]
