"""The compiled training step: every decoder layer compiled by ``torch.compile`` (inductor).

Compiling the layers fuses the small elementwise operations (norms, rotary embeddings, the
gated activation, casts) and lets inductor's partitioner keep fewer activations for backward,
recomputing the cheap ones. Every layer has the same code, so one compiled graph serves them
all. Compilation happens at the first call; inductor caches its output under
``cache_root()/inductor``, so a later run of the same shapes skips most of it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fusionlm.cache import cache_root


def compile_layers(model: nn.Module) -> None:
    """Compile each of ``model.layers`` in place (``nn.Module.compile``: state-dict keys do not
    change). Nothing is compiled until the first forward."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    for layer in model.layers:
        layer.compile()


def uncompile_layers(model: nn.Module) -> None:
    """Undo ``compile_layers``: the layers run eagerly again."""
    for layer in model.layers:
        layer._compiled_call_impl = None  # what nn.Module.compile sets


def is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` came from compiling (no C++ compiler, an unsupported operation or
    backend), not from the model's own computation."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException)


__all__ = ["compile_layers", "is_compile_failure", "uncompile_layers"]
