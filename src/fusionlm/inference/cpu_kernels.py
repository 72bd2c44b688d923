"""Matrix-vector products for CPU decoding that PyTorch lacks, as ``torch.ops.fusionlm`` ops.

Decoding multiplies one activation row per sequence by every weight matrix, so its speed is
the speed of streaming the weights. PyTorch has no fast path on AVX2 CPUs for weights
stored in bf16 (or in int8 with group scales) times fp32 activations, the combinations
that keep a model's outputs close to fp32, and its fp32 GEMM streams a single row at about
half the memory bandwidth. ``cpu_kernels.cpp`` has them: one pass over the weights,
converted in registers, accumulated in fp32:

- ``torch.ops.fusionlm.linear_f32(x [m, k] fp32, weights: [n_i, k] fp32) -> [m, n_i] fp32``
- ``torch.ops.fusionlm.linear_bf16(x [m, k] fp32, weights: [n_i, k] bf16) -> [m, n_i] fp32``
- ``torch.ops.fusionlm.linear_int8(x, weights: [n_i, k] int8, scales: [n_i, k / 32] fp32)``
- ``torch.ops.fusionlm.linear_int4(x, weights: [n_i, k / 2] uint8, scales, offsets:
  [n_i, k / 32] fp32, offsets fp32 or fp16)``: two 4-bit values a byte (see
  ``quantize.WeightOnlyLinear``), ``w = scale * q + offset`` per group of 32 inputs.
- ``torch.ops.fusionlm.linear_w8a8(x, weights: [n_i / 16, k / 32, 512] int8, scales:
  [n_i / 16, k / 32, 16] fp32)``: int8 weights packed by 16 channels, times x rounded to int8
  per group of 32 inputs, for any number of rows (``w8a8_kernels.cpp``, ``int8_activations``).

The int8, int4 and w8a8 kernels' AVX-512 (w8a8: with VNNI), AVX2 and portable paths are
chosen when called, by what the CPU runs: ``torch.ops.fusionlm.cpu_isas()`` lists them,
fastest first, and ``torch.ops.fusionlm.use_isa(name or "auto")`` forces one.

Each takes a list of weights that share the input (a layer's q, k and v projections) and
returns one output per weight, computed in one parallel pass over all their rows.
``torch.ops.fusionlm.dequantize(weight, scale, offset or None)`` gives an int8 or int4
layer's fp32 weight in one pass, and ``torch.ops.fusionlm.linear_tiled(x [m, k], weight,
scale, offset or None) -> [m, n]`` multiplies a prompt's rows by it a few weight rows at a
time, dequantized into a buffer the L1 cache holds. And one attention kernel for decoding
(and short prompt chunks), which reads only the cached keys a query may attend to:

- ``torch.ops.fusionlm.decode_attention(q [b, h, s_q, d], k, v [b, h_kv, s, d], mask, scale)``
  with ``mask`` None or bool ``[1 or b, 1 or h, 1 or s_q, s]``; fp32 in and out.

The same library holds ``torch.classes.fusionlm.StepRunner`` and
``torch.ops.fusionlm.run_step``, which load and run a stored decode step without holding the
GIL (``step_runner.cpp``, used by ``decode_step``).

They are registered with PyTorch's dispatcher in C++, so a compiled decode step calls them
without going through Python. ``load_kernels`` compiles them the first time (about 15 s,
with the C++ compiler inductor also needs, saying so on stderr) into ``kernels/`` under
``fusionlm.cache.cache_root()``, one build per Python, torch and CPU; later processes load
the build (ninja rebuilds it when the source changes).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from fusionlm.cache import cache_root, cpu_fingerprint

INT8_GROUP_SIZE = 32
W8A8_CHANNEL_BLOCK = 16
"""Output channels per packed block of a ``linear_w8a8`` weight."""
MATVEC_MAX_ROWS = 16
"""Up to this many rows (decoding) the matvec kernels beat a GEMM; more rows (a prompt) run
in ``linear_tiled`` (int8, int4) or one GEMM (fp32, bf16)."""
SOURCES = [
    Path(__file__).with_name("cpu_kernels.cpp"),  # and cpu_group_kernels.h, which it includes
    Path(__file__).with_name("w8a8_kernels.cpp"),  # int8 weights x int8 activations
    Path(__file__).with_name("step_runner.cpp"),  # decode_step's runner of stored steps
]


@functools.cache
def load_kernels() -> bool:
    """Build (or load the cached build of) the kernels; False, after a warning, if they
    cannot be built here (callers then compute with PyTorch ops, more slowly)."""
    from torch.utils.cpp_extension import load

    name = "fusionlm_cpu_kernels"
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    # Resolved: torch rebuilds (and loads a second copy of) a build it is shown by another path.
    kernels = (cache_root() / "kernels").resolve()
    build = kernels / f"{python}-torch{torch.__version__}-{cpu_fingerprint()}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build)
        if not (build / f"{name}.so").is_file():
            print(
                "fusionlm: building the CPU kernels for this machine once (about 15 s)",
                file=sys.stderr,
                flush=True,
            )
        load(
            name=name,
            sources=[str(source) for source in SOURCES],
            build_directory=str(build),
            # -fopenmp: without it at::parallel_for compiles to a serial loop.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as error:
        warnings.warn(
            f"fusionlm's CPU kernels could not be built ({error}); decoding falls back to "
            "slower PyTorch ops. Install a C++ compiler (g++) to get them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    torch.library.register_fake("fusionlm::linear_f32")(_outputs_like)
    torch.library.register_fake("fusionlm::linear_bf16")(_outputs_like)
    torch.library.register_fake("fusionlm::linear_int8")(_outputs_like)
    torch.library.register_fake("fusionlm::linear_int4")(_outputs_like)
    torch.library.register_fake("fusionlm::linear_w8a8")(_w8a8_outputs_like)
    torch.library.register_fake("fusionlm::decode_attention")(_attention_output_like)
    torch.library.register_fake("fusionlm::dequantize")(_dequantized_like)
    torch.library.register_fake("fusionlm::linear_tiled")(_tiled_output_like)
    return True


STALE_LOCK_S = 600.0
"""A build lock older than this was left by a build that was killed (a build takes 15-60 s)."""


def clear_stale_lock(build: Path) -> bool:
    """Remove the lock file of a kernel build that was killed midway (torch's
    ``cpp_extension`` waits for it forever otherwise); returns whether there was one."""
    lock = build / "lock"
    try:
        if time.time() - lock.stat().st_mtime < STALE_LOCK_S:
            return False
        lock.unlink()
    except FileNotFoundError:
        return False
    print(f"fusionlm: removed {lock}, left by a kernel build that did not finish", file=sys.stderr)
    return True


def _outputs_like(
    x: Tensor, weights: list[Tensor], *scales_and_offsets: list[Tensor]
) -> list[Tensor]:
    """The ops' outputs for tracing: ``[m, n_i]`` fp32 per weight."""
    return [x.new_empty(x.shape[0], weight.shape[0]) for weight in weights]


def _w8a8_outputs_like(x: Tensor, weights: list[Tensor], scales: list[Tensor]) -> list[Tensor]:
    """``linear_w8a8``'s outputs for tracing: ``[m, 16 * blocks_i]`` fp32 per packed weight."""
    return [x.new_empty(x.shape[0], weight.shape[0] * W8A8_CHANNEL_BLOCK) for weight in weights]


def _dequantized_like(weight: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """``dequantize``'s output for tracing: fp32 ``[n, k]``."""
    return scale.new_empty(weight.shape[0], scale.shape[1] * INT8_GROUP_SIZE)


def _tiled_output_like(x: Tensor, weight: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """``linear_tiled``'s output for tracing: fp32 ``[m, n]``."""
    return x.new_empty(x.shape[0], weight.shape[0])


def _attention_output_like(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """``decode_attention``'s output for tracing: contiguous ``[b, h, s_q, d]`` fp32."""
    return q.new_empty(q.shape)


__all__ = ["INT8_GROUP_SIZE", "MATVEC_MAX_ROWS", "W8A8_CHANNEL_BLOCK", "load_kernels"]
