"""The fine-tuning configuration: one flat dataclass, read from TOML plus ``key=value`` overrides.

TOML because the reader is in the standard library (``tomllib``, Python 3.11+; on 3.10 the
``tomli`` backport if installed), so configs cost no dependency. Every key is a field of
``FinetuneConfig``; an unknown key, a wrong type or an out-of-range value is a ``ValueError``
naming it, raised before any model or data is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fusionlm.errors import InvalidInputError
from fusionlm.models.registry import DEFAULT_MODEL
from fusionlm.modules.attention import get_attention_backend
from fusionlm.modules.lora import LORA_TARGETS


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    """Everything ``finetune`` needs. Paths are relative to the working directory.

    Data and model:
        model: registered name, transformers directory or ``.gguf`` file to start from.
        tokenizer: where to read the tokenizer (default: ``model``).
        train_data: JSONL, one example per line: ``{"messages": [...]}``,
            ``{"prompt": ..., "response": ...}`` (optional ``"system"``) or ``{"text": ...}``.
        val_data: optional JSONL in the same format; gives validation loss and perplexity.
        output_dir: checkpoints, metrics, the loss curve and the final model go here.
        seq_len: tokens per packed row (at most the model's context).
        packing: put several documents in a row (document mask, per-document positions);
            False gives every document its own padded row.
        truncate: cut documents longer than ``seq_len`` instead of raising.
        shuffle: visit rows in a seeded random order each epoch.

    Method:
        lora: train low-rank adapters instead of every weight.
        lora_rank, lora_alpha, lora_dropout: adapter shape, scale (``alpha / rank``), dropout.
        lora_targets: projections that get adapters: ``q_proj k_proj v_proj output_proj w1 w2 w3``.

    Optimisation:
        epochs: passes over the training rows (ignored when ``max_steps`` > 0).
        max_steps: optimizer steps to run in total (0: from ``epochs``).
        batch_size: rows per micro-batch on each process.
        gradient_accumulation_steps: micro-batches per optimizer step. One step sees
            ``batch_size * gradient_accumulation_steps * world_size`` rows.
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_eps: AdamW.
        warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio * learning_rate``.
        max_grad_norm: clip the global gradient norm (0: no clipping).
        bf16: run forward and backward under bf16 autocast; weights and optimizer state stay
            fp32, except LoRA's frozen projections, which are held in bf16. None (the default):
            on where the hardware multiplies bf16 natively (CUDA with bf16, CPUs with
            AVX512-BF16 or AMX), off elsewhere, where bf16 matmuls are emulated and slower than
            fp32.
        gradient_checkpointing: recompute layer activations in backward to save memory.
        compile: compile each decoder layer with ``torch.compile`` (fused elementwise ops,
            fewer stored activations). The first step pays the compilation, which is cached
            for later runs; where compiling fails, the run goes on eagerly after one warning.
        loss_chunk_tokens: tokens whose logits exist at once: the output projection and the
            loss run together over chunks of this many tokens (``LinearCrossEntropyLoss``);
            0: all tokens of a micro-batch at once.
        attn_backend: ``sdpa``, ``eager`` or ``flex`` (a ``BlockMask`` for packed rows).
        seed: seeds initialisation, data order and dropout; equal seeds repeat a run.

    Bookkeeping:
        eval_every: validation every N steps (0: only at the end).
        save_every: a resumable checkpoint every N steps (0: none).
        keep_checkpoints: how many recent checkpoints to keep.
        resume: continue from the latest checkpoint in ``output_dir``.
        save_merged: for LoRA, also write the merged model (the adapter is always written).
        log_every: metrics JSONL record every N steps.
        progress: show a progress bar.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    train_data: str = ""
    val_data: str | None = None
    output_dir: str = "finetune-out"
    seq_len: int = 512
    packing: bool = True
    truncate: bool = False
    shuffle: bool = True

    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    compile: bool = True
    loss_chunk_tokens: int = 256
    attn_backend: str = "sdpa"
    seed: int = 0

    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_merged: bool = True
    log_every: int = 1
    progress: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        if not self.train_data:
            raise InvalidInputError("train_data is required: a JSONL file of training examples")
        positive = ("seq_len", "epochs", "batch_size", "gradient_accumulation_steps", "lora_rank")
        positive += ("log_every", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) < 1:
                raise InvalidInputError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every", "loss_chunk_tokens"):
            if getattr(self, key) < 0:
                raise InvalidInputError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("learning_rate", "adam_eps", "lora_alpha"):
            if not getattr(self, key) > 0:
                raise InvalidInputError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise InvalidInputError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("adam_beta1", "adam_beta2", "lora_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise InvalidInputError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidInputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seq_len < 2:
            raise InvalidInputError(f"seq_len must be >= 2, got {self.seq_len}")
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad or not self.lora_targets:
            raise InvalidInputError(
                f"lora_targets {bad or self.lora_targets} invalid; choose from {list(LORA_TARGETS)}"
            )
        get_attention_backend(self.attn_backend)  # ValueError listing the known backends
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInputError(f"device must be auto, cpu or cuda, got {self.device!r}")


def config_keys() -> list[str]:
    """Every valid configuration key."""
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> FinetuneConfig:
    """A ``FinetuneConfig`` from a TOML file (flat ``key = value`` lines) and ``key=value`` overrides.

    Overrides are parsed by the key's type: ``true``/``false`` for booleans, ``none`` for an
    optional value, comma-separated lists (``lora_targets=q_proj,v_proj``).

    Raises:
        FileNotFoundError: no such config file.
        ValueError: malformed TOML, an unknown key (the message lists the valid ones), a value
            of the wrong type or out of range, an override without ``=``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path)))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInputError(f"override {item!r} must look like key=value")
        _check_key(key, "command line")
        values[key] = _parse_override(key, text.strip())
    return FinetuneConfig(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise InvalidInputError(
                "reading a TOML config needs Python 3.11+ or `pip install tomli`"
            ) from None
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path} is not valid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, Mapping):
            raise InvalidInputError(
                f"{path}: [{key}] is a table; the config is flat key = value lines "
                f"(valid keys: {', '.join(config_keys())})"
            )
        _check_key(key, str(path))
    return data


# Keys of earlier versions, and what took their place.
_REPLACED = {
    "num_output_chunks": "loss_chunk_tokens (tokens per chunk of the output projection fused "
    "with the loss; default 256)",
}


def _check_key(key: str, where: str) -> None:
    if key in _REPLACED:
        raise InvalidInputError(f"config key {key!r} ({where}) is now {_REPLACED[key]}")
    if key not in config_keys():
        raise InvalidInputError(
            f"unknown config key {key!r} ({where}); valid keys: {', '.join(config_keys())}"
        )


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_override(key: str, text: str) -> Any:
    tp, optional = _unwrap_optional(_field_types()[key])
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) is list:
            return [part.strip() for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidInputError(f"{key}={text!r}: expected {_type_name(tp)}") from None
    return text


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return "a comma-separated list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _check_types(config: FinetuneConfig) -> None:
    for key, declared in _field_types().items():
        value = getattr(config, key)
        tp, optional = _unwrap_optional(declared)
        if value is None and optional:
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, float(value))
            continue
        if typing.get_origin(tp) is list:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
                setattr(config, key, value)
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, tp)
        if not ok:
            raise InvalidInputError(f"{key} must be {_type_name(tp)}, got {value!r}")


__all__ = ["FinetuneConfig", "config_keys", "load_config"]
