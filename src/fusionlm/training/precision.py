"""Training precision: whether bf16 is native here, and LoRA's frozen weights held in bf16."""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 matmuls are emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def hold_frozen_in_bf16(model: nn.Module) -> int:
    """Store the frozen weights of ``model``'s linear projections in bf16; returns how many.

    Under bf16 autocast these weights are only ever read as bf16: held so, they take half the
    memory and are not cast again at every forward. Trained weights, norms and embeddings
    (the input side of a tied output matrix) stay as they are, in memory of their own, and
    the memory of the fp32 originals goes back to the system.
    """
    narrowed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, nn.Parameter)
            and not weight.requires_grad
            and weight.dim() == 2
            and not isinstance(module, nn.Embedding)
            and weight.dtype != torch.bfloat16
        ):
            weight.data = weight.data.to(torch.bfloat16)
            narrowed += 1
    if narrowed:
        # The fp32 originals may live in a memory-mapped file (safetensors) that the weights
        # left as they were still map: give those their own memory, so the map is released.
        for param in model.parameters():
            if param.dtype != torch.bfloat16:
                param.data = param.data.clone()
        _return_freed_memory()
    return narrowed


def _return_freed_memory() -> None:
    """Give the freed fp32 weights' pages back to the system. glibc keeps freed heap memory
    for reuse, so the process would go on holding it: 400 MB of the default model's
    projections, a third of a LoRA run's peak. A no-op where libc has no ``malloc_trim``."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has none)
        return
    trim(0)


__all__ = ["hold_frozen_in_bf16", "native_bf16"]
