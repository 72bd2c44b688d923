"""One decode step of a decoder, compiled by inductor: the token loop's fast path.

A decode step feeds one token per sequence through every layer over a fixed-shape KV cache
(``KVCache(fixed_shape=True)``), so every step has the same shapes and runs the same graph.
At batch 1 the step is bound by streaming the weights and by per-step overhead; the
compile settings here were each measured on the default model (see the issue notes):

- fp32 matmuls with at most ``MATVEC_MAX_ROWS`` rows become ``fusionlm::linear_f32``, the
  streaming kernel of ``cpu_kernels`` (weight-only bf16 and int8 layers call theirs
  themselves), and kernel calls that share an input become one call
  (``StreamingMatvecs``, a post-grad graph pass);
- no size and stride asserts in inductor's wrapper (hundreds of Python calls a step);
- dynamo checks the model's modules by their dict version tags instead of re-running
  every guard on every attribute of every module, each step, and skips its per-step check
  of each weight's shape and dtype: ``tensor_layout`` hashes them once per ``DecodeStep``,
  and each layout has its own graphs;
- a ``DecodeStep`` (one per token loop) checks dynamo's guards on its first step only: the
  later steps of the loop see the same model, so they run under
  ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``. (The dict tags above stop
  helping once a module's dicts change, as every generate call's new KV caches do: the
  guards then cost ~1.1 ms per step, against ~0.1 ms skipped.)
"""

from __future__ import annotations

import functools
import itertools
import operator
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fusionlm.inference.cpu_kernels import MATVEC_MAX_ROWS, load_kernels
from fusionlm.modules.decoder import TransformerDecoder

if TYPE_CHECKING:
    from torch._inductor.custom_graph_pass import CustomGraphPass


def forward_step(
    model: TransformerDecoder,
    tokens: Tensor,
    *,
    mask: Tensor | None,
    encoder_mask: Tensor | None,
    input_pos: Tensor,
) -> Tensor:
    """``tokens [b, 1]`` at ``input_pos [b, 1]`` -> next-token logits ``[b, v]``."""
    return model(tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos)[:, -1]


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
            # Per list argument (weights; scales for int8), every call's list, concatenated.
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


def tensor_layout(model: nn.Module) -> int:
    """A hash of the name, shape, strides, dtype, device and ``requires_grad`` of every
    parameter and buffer of ``model`` (its KV caches included)."""
    return hash(
        tuple(
            (name, tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        )
    )


def _checked_by_layout(guard_entries: list) -> list[bool]:
    """dynamo's guards minus the metadata checks of each parameter and buffer (``False`` =
    skip), which ``tensor_layout`` makes once per graph instead of on every step."""
    return [
        not (
            entry.guard_type == "TENSOR_MATCH"
            and ("._parameters[" in entry.name or "._buffers[" in entry.name)
        )
        for entry in guard_entries
    ]


@functools.cache
def compiled_forward_step(*, streaming_matvecs_pass: bool, layout: int) -> Callable[..., Tensor]:
    """``forward_step`` compiled by inductor with the settings of the module doc, for the
    models whose ``tensor_layout`` is ``layout``.

    Each layout gets a copy of ``forward_step`` with its own code object (dynamo keeps its
    graphs per code object), so a graph never runs on weights of another shape. The layout
    covers the KV caches, so a batch size or cache length also gets its own copy; nearby
    prompt lengths share one (``generation.CACHE_LENGTH_MULTIPLE``). ``streaming_matvecs_pass``
    adds ``StreamingMatvecs`` (when the kernels built).
    """
    options: dict[str, object] = {"size_asserts": False, "guard_filter_fn": _checked_by_layout}
    if streaming_matvecs_pass:
        options["post_grad_custom_post_pass"] = streaming_matvecs()
    step = types.FunctionType(forward_step.__code__.replace(), forward_step.__globals__)
    compiled = torch.compile(step, dynamic=False, options=options)
    return torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)(compiled)


class DecodeStep:
    """One decode step of ``model``, compiled by inductor (``compile=True``) or eager.

    If inductor cannot build the graph (typically: no C++ compiler), it warns once and
    decodes eagerly from then on; nothing has run yet when compilation fails. Make one per
    token loop, and do not change the model during it: only its first step checks that the
    compiled graph still fits the model.
    """

    def __init__(self, model: TransformerDecoder, *, compile: bool) -> None:
        self.model = model
        self.guards_checked = False
        # The compiled step for this model's layout, looked up once (None: eager).
        self.compiled_step = (
            compiled_forward_step(
                streaming_matvecs_pass=load_kernels(), layout=tensor_layout(model)
            )
            if compile
            else None
        )

    def __call__(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None,
        encoder_mask: Tensor | None,
        input_pos: Tensor,
    ) -> Tensor:
        """``tokens [b, 1]`` at ``input_pos [b, 1]`` -> next-token logits ``[b, v]``."""
        if self.compiled_step is not None:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=self.guards_checked):
                    logits = self.compiled_step(
                        self.model,
                        tokens,
                        mask=mask,
                        encoder_mask=encoder_mask,
                        input_pos=input_pos,
                    )
                self.guards_checked = True
                return logits
            except torch._dynamo.exc.BackendCompilerFailed as error:
                warnings.warn(
                    f"decoding eagerly: torch.compile could not build the decode step ({error}); "
                    "install a C++ compiler (g++) for the fast path",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled_step = None
        return forward_step(
            self.model, tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos
        )


__all__ = ["DecodeStep", "compiled_forward_step", "forward_step"]
