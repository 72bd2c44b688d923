"""One decode step of a decoder, compiled by inductor: the token loop's fast path.

A decode step feeds one token per sequence through every layer over a fixed-shape KV cache
(``KVCache(fixed_shape=True)``), so every step has the same shapes and runs the same graph.
At batch 1 the step is bound by streaming the weights and by per-step overhead; the
compile settings here were each measured on the default model (see the issue notes):

- fp32 matmuls with at most ``MATVEC_MAX_ROWS`` rows become ``fusionlm::linear_f32``, the
  streaming kernel of ``cpu_kernels`` (``StreamingMatvecs``, a post-grad graph pass);
  weight-only bf16 and int8 layers call their kernels themselves.
- no size and stride asserts in inductor's wrapper (hundreds of Python calls a step);
- dynamo checks the model's modules by their dict version tags instead of re-running
  every guard on every attribute of every module, each step.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

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
    """The graph pass that sends small fp32 matmuls to ``fusionlm::linear_f32`` (made on
    first use: importing inductor takes seconds)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class StreamingMatvecs(CustomGraphPass):
        """``mm(x [m, k], permute(w [n, k], [1, 0]))`` with ``m <= MATVEC_MAX_ROWS``, both
        fp32 -> ``fusionlm::linear_f32(x, w)``: one pass over ``w`` at about twice the
        bandwidth of the BLAS call (the lm_head of the default model: 12 vs 9 GB/s)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            aten = torch.ops.aten
            for node in list(graph.find_nodes(op="call_function", target=aten.mm.default)):
                x, transposed = node.args
                if not (
                    isinstance(transposed, torch.fx.Node)
                    and transposed.target is aten.permute.default
                    and list(transposed.args[1]) == [1, 0]
                ):
                    continue
                weight = transposed.args[0]
                x_val, w_val = x.meta["val"], weight.meta["val"]
                if (
                    x_val.dtype != torch.float32
                    or w_val.dtype != torch.float32
                    or x_val.shape[0] > MATVEC_MAX_ROWS
                    or not w_val.is_contiguous()
                ):
                    continue
                with graph.inserting_before(node):
                    matvec = graph.call_function(torch.ops.fusionlm.linear_f32.default, (x, weight))
                matvec.meta.update(node.meta)
                node.replace_all_uses_with(matvec)
                graph.erase_node(node)

        def uuid(self) -> bytes:
            return get_hash_for_files((__file__,))

    return StreamingMatvecs()


@functools.cache
def compiled_forward_step(*, fp32_matvecs: bool) -> Callable[..., Tensor]:
    """``forward_step`` compiled by inductor with the settings of the module doc. One
    function for every model: dynamo keeps a graph per model, batch size and cache length,
    up to ``torch._dynamo.config.recompile_limit`` of them.

    ``fp32_matvecs`` adds ``StreamingMatvecs`` (for fp32 models, when the kernels built).
    """
    options: dict[str, object] = {"size_asserts": False}
    if fp32_matvecs:
        options["post_grad_custom_post_pass"] = streaming_matvecs()
    compiled = torch.compile(forward_step, dynamic=False, options=options)
    return torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)(compiled)


class DecodeStep:
    """One decode step of ``model``, compiled by inductor (``compile=True``) or eager.

    If inductor cannot build the graph (typically: no C++ compiler), it warns once and
    decodes eagerly from then on; nothing has run yet when compilation fails.
    """

    def __init__(self, model: TransformerDecoder, *, compile: bool) -> None:
        self.model = model
        self.compiled = compile
        self.fp32_matvecs = (
            compile and model.tok_embeddings.weight.dtype == torch.float32 and load_kernels()
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
        if self.compiled:
            try:
                return compiled_forward_step(fp32_matvecs=self.fp32_matvecs)(
                    self.model, tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos
                )
            except torch._dynamo.exc.BackendCompilerFailed as error:
                warnings.warn(
                    f"decoding eagerly: torch.compile could not build the decode step ({error}); "
                    "install a C++ compiler (g++) for the fast path",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.compiled = False
        return forward_step(
            self.model, tokens, mask=mask, encoder_mask=encoder_mask, input_pos=input_pos
        )


__all__ = ["DecodeStep", "compiled_forward_step", "forward_step"]
