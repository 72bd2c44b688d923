"""Shared fixtures: tiny random transformers Llama models saved to temp dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import empty_cache, make_hf_llama


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One tiny GQA model shared by tests that only read it."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    return directory, make_hf_llama(directory)


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
