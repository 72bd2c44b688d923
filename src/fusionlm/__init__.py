"""fusionlm: Llama-family decoders and deep-fusion multimodal models on PyTorch.

The names below are imported on first use (PEP 562), so ``import fusionlm`` costs nothing
until one is touched, and a command imports only what it runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fusionlm.generation import SamplingParams, generate, generate_stream
    from fusionlm.inference.decode_step import compile_decode_step
    from fusionlm.loading import describe, load_model, load_tokenizer, save_hf
    from fusionlm.models.llama import LlamaConfig, llama
    from fusionlm.modules.decoder import TransformerDecoder, disable_kv_cache
    from fusionlm.tokenizer import Tokenizer

_HOMES = {
    "LlamaConfig": "fusionlm.models.llama",
    "SamplingParams": "fusionlm.generation",
    "Tokenizer": "fusionlm.tokenizer",
    "TransformerDecoder": "fusionlm.modules.decoder",
    "compile_decode_step": "fusionlm.inference.decode_step",
    "describe": "fusionlm.loading",
    "disable_kv_cache": "fusionlm.modules.decoder",
    "generate": "fusionlm.generation",
    "generate_stream": "fusionlm.generation",
    "llama": "fusionlm.models.llama",
    "load_model": "fusionlm.loading",
    "load_tokenizer": "fusionlm.loading",
    "save_hf": "fusionlm.loading",
}
__all__ = [
    "LlamaConfig",
    "SamplingParams",
    "Tokenizer",
    "TransformerDecoder",
    "compile_decode_step",
    "describe",
    "disable_kv_cache",
    "generate",
    "generate_stream",
    "llama",
    "load_model",
    "load_tokenizer",
    "save_hf",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fusionlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
