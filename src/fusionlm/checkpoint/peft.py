"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are transformers' names (through ``HF_LLAMA_KEYS``) under PEFT's prefix, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so
``peft.PeftModel.from_pretrained(transformers_model, directory)`` loads what we save and
``load_peft_adapter`` loads what PEFT saves (LoRA on Llama projections, no bias training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fusionlm.checkpoint.keys import HF_LLAMA_KEYS
from fusionlm.errors import InvalidInputError
from fusionlm.files import atomic_write, atomic_write_text, read_json_object
from fusionlm.modules.lora import LoRALinear, apply_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Our projection attribute names and transformers' module names for them.
_TARGET_NAMES = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}
_OUR_TARGETS = {theirs: ours for ours, theirs in _TARGET_NAMES.items()}


def _adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the model's LoRA adapters (and nothing else) as a PEFT adapter directory.

    Raises:
        ValueError: the model has no adapters, or adapters with different rank/alpha/dropout
            (PEFT's config holds one of each).
    """
    adapters = _adapters(model)
    if not adapters:
        raise InvalidInputError("the model has no LoRA adapters to save; apply_lora() first")
    settings = {(m.rank, m.alpha, m.dropout_p) for m in adapters.values()}
    if len(settings) > 1:
        raise InvalidInputError(f"adapters differ in (rank, alpha, dropout): {sorted(settings)}")
    rank, alpha, dropout = settings.pop()
    tensors: dict[str, Tensor] = {}
    for name, module in adapters.items():
        theirs = HF_LLAMA_KEYS.to_theirs(f"{name}.weight")
        if theirs is None:
            raise InvalidInputError(f"no transformers name for the adapted projection {name!r}")
        stem = theirs.removesuffix(".weight")
        tensors[f"{_PREFIX}{stem}.lora_A.weight"] = module.lora_a.weight.detach().contiguous()
        tensors[f"{_PREFIX}{stem}.lora_B.weight"] = module.lora_b.weight.detach().contiguous()
    targets = sorted({_TARGET_NAMES[name.rsplit(".", 1)[-1]] for name in adapters})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.to("cpu") for k, v in tensors.items()}
    atomic_write(
        directory / ADAPTER_WEIGHTS, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"})
    )
    atomic_write_text(
        directory / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
    return directory


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> list[str]:
    """Add the LoRA adapter saved in ``directory`` to ``model`` (see ``apply_lora``).

    Returns:
        the qualified names of the adapted projections.

    Raises:
        FileNotFoundError: a missing adapter file.
        ValueError: not a LoRA adapter, options we do not implement (rslora, DoRA, bias, per-layer
            patterns), or tensors that do not fit the model.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} has no {path.name}; is it a PEFT adapter?")
    config = read_json_object(config_path)
    if config.get("peft_type") != "LORA":
        raise InvalidInputError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [
        key
        for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise InvalidInputError(f"{config_path}: unsupported LoRA options {unsupported}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str) or any(t not in _OUR_TARGETS for t in targets):
        raise InvalidInputError(
            f"{config_path}: target_modules {targets!r} must be a list of {sorted(_OUR_TARGETS)}"
        )
    wrapped = apply_lora(
        model,
        targets=[_OUR_TARGETS[t] for t in targets],
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
    )
    try:
        with safe_open(weights_path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise InvalidInputError(f"cannot read {weights_path}: {e}") from None
    adapters = _adapters(model)
    expected = set()
    for name, module in adapters.items():
        stem = _PREFIX + HF_LLAMA_KEYS.to_theirs(f"{name}.weight").removesuffix(".weight")
        for ours, theirs in ((module.lora_a, "lora_A"), (module.lora_b, "lora_B")):
            # PEFT may keep the adapter name in the key ("lora_A.default.weight").
            key = next(
                (
                    k
                    for k in (f"{stem}.{theirs}.weight", f"{stem}.{theirs}.default.weight")
                    if k in tensors
                ),
                None,
            )
            if key is None or tensors[key].shape != ours.weight.shape:
                found = None if key is None else tuple(tensors[key].shape)
                raise InvalidInputError(
                    f"{weights_path}: {stem}.{theirs}.weight missing or of shape {found}, "
                    f"expected {tuple(ours.weight.shape)}"
                )
            expected.add(key)
            with torch.no_grad():
                ours.weight.copy_(tensors[key])
    extra = sorted(set(tensors) - expected)
    if extra:
        raise InvalidInputError(f"{weights_path}: tensors the model has no place for: {extra[:5]}")
    return wrapped


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_peft_adapter", "save_peft_adapter"]
