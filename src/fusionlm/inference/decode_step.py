"""One decode step of a decoder, compiled ahead of time and kept on disk: the token loop's
fast path.

A decode step feeds one token per row through every layer over a fixed-shape KV cache
(``KVCache(fixed_shape=True)``), so every step has the same shapes and runs one graph.
``torch.export`` captures that graph and AOTInductor compiles it into a shared library
with a C++ wrapper (no Python between the ~150 kernel calls of a step), stored as a
``.pt2`` package under ``cache_dir()``. Later processes load the package in milliseconds
instead of tracing and compiling again; the weights are not in it: a loaded step is bound
to the model's own tensors (and its KV cache) for each token loop.

A stored step is found by ``step_key``, a hash of everything that changes the graph or its
numbers: the model's structure (every module's class and plain attributes, so a changed
``scale`` or ``eps`` is a new key), every tensor's name, shape, strides and dtype (the
quantization with them), the batch size and cache length, the thread count, the torch
version, the CPU and fusionlm's own modelling and kernel sources. The key is stored in the
package too and checked on load, so a renamed, foreign or truncated file is removed (and
rebuilt), never run. Builds write to a temporary name and rename it into place, under a
file lock, so concurrent processes neither corrupt nor duplicate each other's work.

Three compile settings, each measured on the default model:

- fp32 matmuls with at most ``MATVEC_MAX_ROWS`` rows become ``fusionlm::linear_f32``, the
  streaming kernel of ``cpu_kernels`` (weight-only bf16, int8 and int4 layers call theirs
  themselves), and kernel calls that share an input become one call
  (``StreamingMatvecs``, a post-grad graph pass);
- no constant folding of uniform buffers (``joint_graph_constant_folding``): a KV cache's
  write position is a zero-filled buffer when the graph is traced, and folding it would
  bake "slot 0" into every step;
- inductor's own kernels (norms, rope, cache writes, activations) run on one thread
  (``SERIAL_CHUNK``): each does a few thousand values, less than waking the other threads
  costs, and a norm it splits across threads sums in an order that depends on their count,
  which ``ThreadPlanner`` changes from step to step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import operator
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from fusionlm.cache import cache_root, cpu_fingerprint
from fusionlm.errors import InvalidInputError
from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS, load_kernels
from fusionlm.inference.threads import ThreadPlanner
from fusionlm.modules.decoder import TransformerDecoder, masks_cover_filled_slots, slot_cache
from fusionlm.modules.kv_cache import KVCache

if TYPE_CHECKING:
    from torch._inductor.custom_graph_pass import CustomGraphPass

STEP_FORMAT = 1
"""Bumped when what a stored step takes or returns changes."""
SERIAL_CHUNK = 1 << 30
"""Inductor's ``cpp.min_chunk_size`` for a step: elements a thread must get before a loop
runs in parallel, so large that none does (the matvecs and attention are ``cpu_kernels``'
own, parallel, ops)."""
CompileMode = Literal["auto"] | bool
"""``True``: use the stored step, building it first if needed; ``"auto"``: use it if
stored, else decode eagerly; ``False``: decode eagerly."""


def cache_dir() -> Path:
    """Where compiled decode steps are stored: ``decode-steps/`` under ``cache_root()``
    (``$FUSIONLM_CACHE_DIR``, else ``~/.cache/fusionlm``)."""
    return cache_root() / "decode-steps"


def forward_step(
    model: TransformerDecoder,
    tokens: Tensor,
    *,
    mask: Tensor | None,
    encoder_mask: Tensor | None = None,
    input_pos: Tensor,
) -> Tensor:
    """``tokens [b, 1]`` at ``input_pos [b, 1]`` -> next-token logits ``[b, v]``. For a
    ``TransformerDecoder``, ``mask`` must leave out the unfilled slots (``DecodeStep`` narrows
    it so); a row whose mask allows no slot is idle: it carries zeros, which the matvec
    kernels skip, and its logits mean nothing."""
    # isinstance: torch.export traces the model as an instance of a subclass it makes.
    if mask is None or not isinstance(model, TransformerDecoder):  # fusion models: every row
        return model(tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos)[:, -1]
    active_rows = mask.flatten(1).any(dim=1)
    with masks_cover_filled_slots(model):
        return model(
            tokens,
            mask=mask,
            encoder_mask=encoder_mask,
            input_pos=input_pos,
            active_rows=active_rows,
        )[:, -1]


class _StepGraph(nn.Module):
    """What is exported: ``forward_step`` with the mask as a tensor input."""

    def __init__(self, model: TransformerDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, input_pos: Tensor, mask: Tensor) -> Tensor:
        return forward_step(self.model, tokens, mask=mask, input_pos=input_pos)


def step_key(
    model: TransformerDecoder,
    *,
    batch_size: int,
    cache_len: int,
    cache_dtype: torch.dtype | None = None,
) -> str:
    """The name of ``model``'s decode step at this batch size, cache length and cache dtype
    (None: the model's; see the module doc for what it covers). Caches set up on the model or
    not, the key is the same."""
    modules = []
    for name, module in model.named_modules():
        if isinstance(module, KVCache):
            continue
        plain = {
            k: v
            for k, v in sorted(vars(module).items())
            if not k.startswith("_")
            and k not in ("kv_cache", "cache_enabled")  # the step always runs with caches
            and isinstance(v, str | int | float | bool | type(None))
        }
        modules.append((name, type(module).__qualname__, plain))
    tensors = [
        (name, tuple(t.shape), t.stride(), str(t.dtype), str(t.device), t.requires_grad)
        for name, t in _named_tensors(model, prefix="").items()
        if ".kv_cache." not in name
    ]
    parts = {
        "format": STEP_FORMAT,
        "modules": modules,
        "tensors": tensors,
        "batch_size": batch_size,
        "cache_len": cache_len,
        "cache_dtype": str(cache_dtype or model.dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version_info[:2],
        "cpu": cpu_fingerprint(),
        "sources": _source_fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


@functools.cache
def _source_fingerprint() -> str:
    """fusionlm's modelling and kernel sources, which shape the traced graph."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*package.glob("modules/*.py"), *package.glob("inference/*.[pch]*")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _named_tensors(model: nn.Module, *, prefix: str) -> dict[str, Tensor]:
    """Every parameter and buffer by name, shared ones under each of their names."""
    return {
        **dict(model.named_parameters(prefix=prefix, remove_duplicate=False)),
        **dict(model.named_buffers(prefix=prefix, remove_duplicate=False)),
    }


def compile_decode_step(
    model: TransformerDecoder,
    *,
    batch_size: int = 1,
    cache_len: int = 256,
    cache_dtype: torch.dtype | None = None,
    directory: Path | None = None,
) -> Path:
    """Build ``model``'s decode step for this batch size, cache length and KV cache dtype
    (None: the model's), unless it is stored already; returns the package's path. Says on
    stderr what it compiles and how long it took (tens of seconds on two cores).

    Raises:
        TypeError: not a ``TransformerDecoder`` (fusion models decode eagerly).
        ValueError: ``cache_len`` beyond the model's context.
        OSError: the directory cannot be written.
    """
    if type(model) is not TransformerDecoder:
        raise TypeError(
            f"only a TransformerDecoder's decode step can be compiled, not {type(model).__name__}"
        )
    if not 1 <= cache_len <= model.max_seq_len:
        raise InvalidInputError(f"cache_len must be in [1, {model.max_seq_len}], got {cache_len}")
    shape = {"batch_size": batch_size, "cache_len": cache_len, "cache_dtype": cache_dtype}
    key, path = _locate(model, **shape, directory=directory)
    _build_unless_stored(model, key=key, path=path, **shape)
    return path


def _locate(
    model: TransformerDecoder,
    *,
    batch_size: int,
    cache_len: int,
    cache_dtype: torch.dtype | None = None,
    directory: Path | None = None,
) -> tuple[str, Path]:
    """``model``'s step key for these settings and the package's path under ``directory``
    (default ``cache_dir()``)."""
    key = step_key(model, batch_size=batch_size, cache_len=cache_len, cache_dtype=cache_dtype)
    return key, (directory or cache_dir()) / f"{key}.pt2"


def _build_unless_stored(
    model: TransformerDecoder,
    *,
    key: str,
    path: Path,
    batch_size: int,
    cache_len: int,
    cache_dtype: torch.dtype | None = None,
) -> None:
    """Build the step named ``key`` into ``path`` unless a loadable one is there (perhaps
    just built by another process), saying on stderr what it compiles and how long it took."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        if _stored_loader(path, key) is not None:
            return
        print(
            f"fusionlm: compiling the decode step for this machine once (batch {batch_size}, "
            f"{cache_len} slots, {torch.get_num_threads()} threads; about a minute on two "
            f"cores); later runs load it from {path.parent}",
            file=sys.stderr,
            flush=True,
        )
        started = time.perf_counter()
        _build(
            model,
            key=key,
            path=path,
            batch_size=batch_size,
            cache_len=cache_len,
            cache_dtype=cache_dtype,
        )
        path.with_suffix(".log").unlink(missing_ok=True)  # a failed background build's log
        print(
            f"fusionlm: compiled the decode step in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Held while ``path`` is built: a second builder waits, then finds it built."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_in_progress(path: Path) -> bool:
    """Whether another process holds ``path``'s build lock now."""
    try:
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _build(
    model: TransformerDecoder,
    *,
    key: str,
    path: Path,
    batch_size: int,
    cache_len: int,
    cache_dtype: torch.dtype | None,
) -> None:
    from torch._inductor import aoti_compile_and_package

    load_kernels()
    had_caches = model.caches_are_setup()
    if not had_caches:
        model.setup_caches(
            batch_size,
            cache_dtype or model.dtype,
            decoder_max_seq_len=cache_len,
            fixed_shape=True,
        )
    try:
        example = (
            torch.zeros(batch_size, 1, dtype=torch.long),
            torch.zeros(batch_size, 1, dtype=torch.long),
            torch.ones(batch_size, 1, 1, cache_len, dtype=torch.bool),
        )
        # A token loop may ask for its step inside inference mode, which export does not trace.
        with torch.inference_mode(False), torch.no_grad():
            program = torch.export.export(_StepGraph(model), example, strict=False)
    finally:
        if not had_caches:
            model.remove_caches()
    options: dict[str, object] = {
        "joint_graph_constant_folding": False,
        "cpp.min_chunk_size": SERIAL_CHUNK,
        "size_asserts": False,
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.metadata": {"fusionlm_key": key},
    }
    if load_kernels():
        options["post_grad_custom_post_pass"] = streaming_matvecs()
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _stored_loader(path: Path, key: str) -> _LoadedStep | None:
    """The loaded step named ``key`` at ``path``; None if there is none (a broken or foreign
    one is removed, with a warning, so that a build replaces it)."""
    if not path.is_file():
        return None
    try:
        return _load_package(str(path), path.stat().st_mtime_ns, key)
    except StaleStepError as error:
        warnings.warn(f"{error}; it will be rebuilt", RuntimeWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return None


class StaleStepError(Exception):
    """A stored decode step that must not run: unreadable, or built for other settings."""


@dataclasses.dataclass
class _LoadedStep:
    """A loaded package, and the tensors it was last bound to (see ``_bind``): kept together,
    so a package loaded again after leaving ``_load_package``'s cache is bound again."""

    runner: torch.ScriptObject  # torch.classes.fusionlm.StepRunner
    bound: dict[str, Tensor] | None = None


@functools.lru_cache(maxsize=8)
def _load_package(path: str, mtime_ns: int, key: str) -> _LoadedStep:
    """The loaded package at ``path`` (once per process and version of the file).

    AOTInductor's loader is called directly, through ``step_runner.cpp`` (in fusionlm's
    kernel library), whose steps let go of the GIL while they run:
    ``torch._inductor.aoti_load_package`` imports inductor (~1 s) and compiles probe programs
    to compare vector ISAs (~0.9 s, every process), a check ``step_key`` already makes, while
    this loader takes ~5 ms; and torch's binding of the loader holds the GIL for a whole step.
    The compiled tests run through it, so a torch that changes it fails them.
    """
    if not load_kernels():  # the package calls fusionlm's ops, and the runner is among them
        raise RuntimeError("fusionlm's CPU kernels, which a compiled step calls, are not built")
    try:
        loader = torch.classes.fusionlm.StepRunner(path)
        stored_key = loader.metadata().get("fusionlm_key")
    except RuntimeError as error:
        raise StaleStepError(
            f"the stored decode step {path} is unreadable ({str(error).splitlines()[0]})"
        ) from None
    if stored_key != key:
        raise StaleStepError(
            f"the stored decode step {path} was built for other settings (key {stored_key})"
        )
    return _LoadedStep(loader)


def stored_step_path(
    model: TransformerDecoder,
    *,
    batch_size: int,
    cache_len: int,
    cache_dtype: torch.dtype | None = None,
) -> Path:
    """Where ``model``'s decode step for these settings is stored (or would be)."""
    return _locate(model, batch_size=batch_size, cache_len=cache_len, cache_dtype=cache_dtype)[1]


def _bind(step: _LoadedStep, model: TransformerDecoder) -> None:
    """Make ``step`` compute with ``model``'s own tensors (user-managed: not copied), so the
    step reads its weights and writes its KV caches.

    AOTInductor keeps a reference to every user-managed tensor it is given, for good (torch
    2.13: ``MaybeOwningAtenTensorHandle`` makes a handle it never frees), so binding each
    token loop's fresh caches kept them all: +12 MB per short reply and +35 MB per 512-token
    prompt of the default model, without end. A step already bound to this model's weights
    keeps its caches instead: the model's new, empty caches are copied into them and the
    model computes on those. Only a step run for another model (or new cache shapes) binds
    again.
    """
    tensors = _named_tensors(model, prefix="model")
    wanted = {name: tensors[name] for name in step.runner.constant_fqns()}
    bound = step.bound
    caches = {
        name for name, module in model.named_modules(prefix="model") if isinstance(module, KVCache)
    }

    def in_cache(name: str) -> bool:
        return name.rsplit(".", 1)[0] in caches

    reusable = bound is not None and all(
        (tensor.shape, tensor.dtype) == (bound[name].shape, bound[name].dtype)
        if in_cache(name)
        else tensor is bound[name]
        for name, tensor in wanted.items()
    )
    if not reusable:
        step.runner.bind(wanted)
        step.bound = wanted
        return
    for name, tensor in wanted.items():
        if in_cache(name) and tensor is not bound[name]:
            held = bound[name].copy_(tensor)
            module_name, attribute = name.removeprefix("model.").rsplit(".", 1)
            setattr(model.get_submodule(module_name), attribute, held)


class DecodeStep:
    """One decode step of ``model`` over its fixed-shape KV cache, set up for this token
    loop: the stored compiled step where there is one (``compile`` says what happens where
    there is not, see ``CompileMode``), else eager. The math is the same either way. Each
    compiled step runs on all of torch's threads or on one, whichever is faster now
    (``ThreadPlanner``: on shared cores, one thread that never waits beats two that wait on
    each other); its kernels give the same numbers on any thread count. Eager steps keep
    torch's thread count: BLAS may split a matmul's sums by thread, and a server's rows must
    not change with the load.

    A step that cannot be loaded or built (no C++ compiler, an unwritable cache directory)
    warns once and decodes eagerly; a fusion model decodes eagerly. Make one per token loop,
    after ``setup_caches``: the compiled step is bound to this loop's weights and caches, so a
    process runs one token loop at a time per stored step (a later ``DecodeStep`` rebinds it).
    """

    def __init__(self, model: TransformerDecoder, *, compile: CompileMode) -> None:
        self.model = model
        self.runner = None
        self.threads = ThreadPlanner(torch.get_num_threads())
        # Whose filled slots narrow each step's mask (None: the mask is used as it is).
        self.slots = slot_cache(model) if type(model) is TransformerDecoder else None
        caches = [m for m in model.modules() if isinstance(m, KVCache)]
        if compile is False or type(model) is not TransformerDecoder or not caches:
            return
        shape = {
            "batch_size": caches[0].batch_size,
            "cache_len": caches[0].max_seq_len,
            "cache_dtype": caches[0].k_cache.dtype,
        }
        key, path = _locate(model, **shape)
        try:
            if compile is True:
                _build_unless_stored(model, key=key, path=path, **shape)
            step = _stored_loader(path, key)
            if step is None:
                return
            _bind(step, model)
        except (OSError, RuntimeError, KeyError) as error:
            warnings.warn(
                f"decoding eagerly: the compiled decode step is not available ({error})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.runner = step.runner

    @property
    def compiled(self) -> bool:
        """Whether the steps run the compiled graph."""
        return self.runner is not None

    def __call__(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None,
        encoder_mask: Tensor | None,
        input_pos: Tensor,
    ) -> Tensor:
        """``tokens [b, 1]`` at ``input_pos [b, 1]`` -> next-token logits ``[b, v]``.
        ``mask``: bool ``[b, 1, 1, cache length]`` or None (every filled slot)."""
        if self.slots is not None:  # narrowed here, outside the compiled graph, once a step
            filled = self.slots.filled_mask(1, causal=True, pending=1)
            mask = filled if mask is None else mask & filled
        if self.runner is None:
            return forward_step(
                self.model, tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos
            )
        with self.threads.step():
            (logits,) = torch.ops.fusionlm.run_step(self.runner, [tokens, input_pos, mask])
            return logits


def streaming_matvecs() -> CustomGraphPass:
    """The graph pass that sends a decode step's matvecs to ``cpu_kernels``, fewest calls
    first (made on first use: importing inductor takes seconds)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    from torch._inductor.pattern_matcher import stable_topological_sort

    aten, fusionlm = torch.ops.aten, torch.ops.fusionlm
    matvec_ops = (
        fusionlm.linear_f32.default,
        fusionlm.linear_bf16.default,
        fusionlm.linear_int8.default,
        fusionlm.linear_int4.default,
        fusionlm.linear_w8a8.default,
    )
    view_ops = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

    def same_input(x: torch.fx.Node) -> object:
        """What a matvec's input is, up to a fresh view of the same tensor."""
        if x.target in view_ops:
            return (x.args[0], tuple(x.args[1]))
        return x

    class StreamingMatvecs(CustomGraphPass):
        """Two rewrites of the post-grad graph:

        1. ``mm(x [m, k], permute(w [n, k], [1, 0]))`` with ``m <= MATVEC_MAX_ROWS``, both
           fp32 -> ``fusionlm::linear_f32(x, [w])``: one pass over ``w`` at about twice the
           bandwidth of the BLAS call (the lm_head of the default model: 24 vs 12 GB/s).
        2. Calls of one kernel on the same input (a layer's q, k and v projections; its gate
           and up projections) -> one call with all their weights: fewer calls, thread
           wake-ups and Python lines per step.
        """

        def __call__(self, graph: torch.fx.Graph) -> None:
            for node in list(graph.find_nodes(op="call_function", target=aten.mm.default)):
                self.stream_fp32_matmul(graph, node)
            groups: dict[tuple, list[torch.fx.Node]] = {}
            for node in graph.nodes:
                if node.target in matvec_ops and all(
                    reader.target is operator.getitem for reader in node.users
                ):
                    groups.setdefault((node.target, same_input(node.args[0])), []).append(node)
            for calls in groups.values():
                if len(calls) > 1:
                    self.merge(graph, calls)
            stable_topological_sort(graph)  # a merged call may read weights defined after it

        @staticmethod
        def stream_fp32_matmul(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
            x, transposed = node.args
            if not (
                isinstance(transposed, torch.fx.Node)
                and transposed.target is aten.permute.default
                and list(transposed.args[1]) == [1, 0]
            ):
                return
            weight = transposed.args[0]
            x_val, w_val = x.meta["val"], weight.meta["val"]
            if (
                x_val.dtype != torch.float32
                or w_val.dtype != torch.float32
                or x_val.shape[0] > MATVEC_MAX_ROWS
                or not w_val.is_contiguous()
            ):
                return
            with graph.inserting_before(node):
                matvec = graph.call_function(fusionlm.linear_f32.default, (x, [weight]))
                matvec.meta["val"] = [node.meta["val"]]
                output = graph.call_function(operator.getitem, (matvec, 0))
            output.meta.update(node.meta)
            node.replace_all_uses_with(output)
            graph.erase_node(node)

        @staticmethod
        def merge(graph: torch.fx.Graph, calls: list[torch.fx.Node]) -> None:
            """One call in place of ``calls`` (same kernel, same input, in graph order); the
            outputs' readers (``getitem``) read the merged call's outputs instead."""
            first = calls[0]
            # Per list argument (weights; scales for int8, int4 and w8a8; offsets for int4),
            # every call's list, concatenated.
            lists = [
                [tensor for call in calls for tensor in call.args[position]]
                for position in range(1, len(first.args))
            ]
            with graph.inserting_before(first):
                merged = graph.call_function(first.target, (first.args[0], *lists))
            merged.meta["val"] = [val for call in calls for val in call.meta["val"]]
            offset = 0
            for call in calls:
                for reader in list(call.users):
                    reader.args = (merged, offset + reader.args[1])
                offset += len(call.args[1])
                graph.erase_node(call)

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__,))

    return StreamingMatvecs()


__all__ = [
    "DecodeStep",
    "StaleStepError",
    "build_in_progress",
    "cache_dir",
    "compile_decode_step",
    "forward_step",
    "step_key",
    "stored_step_path",
]
