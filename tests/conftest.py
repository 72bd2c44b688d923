"""Shared fixtures: tiny random transformers Llama models saved to temp dirs."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fusionlm.cache import cache_root

BASE_CONFIG: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    "tie_word_embeddings": False,
}


def randomize_(model: torch.nn.Module, *, seed: int = 0) -> None:
    """Weights with O(1) logits, so a parity check at 1e-4 can fail (0.02-std init gives ~0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * p.shape[-1] ** -0.5)


def make_hf_llama(directory: Path, **overrides: Any):
    """Build, randomise and save a transformers LlamaForCausalLM; returns it in fp32 eval mode."""
    import transformers

    config = transformers.LlamaConfig(**{**BASE_CONFIG, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    # str hashes change per process (PYTHONHASHSEED); crc32 gives each directory one model.
    randomize_(model, seed=zlib.crc32(directory.name.encode()) % 1000)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One tiny GQA model shared by tests that only read it."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    return directory, make_hf_llama(directory)


MACHINE_KERNELS = cache_root() / "kernels"
"""This machine's builds of fusionlm's CPU kernels, which every test cache shares."""


def empty_cache(directory: Path) -> Path:
    """``directory`` as a fusionlm cache with no compiled decode steps, sharing this
    machine's kernel builds (building them again would only cost time)."""
    directory.mkdir(parents=True, exist_ok=True)
    MACHINE_KERNELS.mkdir(parents=True, exist_ok=True)
    (directory / "kernels").symlink_to(MACHINE_KERNELS, target_is_directory=True)
    return directory


@pytest.fixture(scope="session", autouse=True)
def step_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Compiled decode steps go to one directory of this session, which starts empty: with
    ``compile="auto"`` (the default) every test decodes eagerly over the fixed-shape cache,
    unless it builds a step (``compile=True``, marked ``compiled``); no command a test runs
    starts a background build. The user's own decode steps are never read or written."""
    directory = empty_cache(tmp_path_factory.mktemp("fusionlm-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSIONLM_CACHE_DIR", str(directory))
        patch.setenv("FUSIONLM_BACKGROUND_COMPILE", "0")
        yield directory
