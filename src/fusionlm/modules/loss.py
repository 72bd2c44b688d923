"""Token cross-entropy for training without the whole fp32 logits.

``LinearCrossEntropyLoss`` takes the final hidden states and the output matrix and never holds
more than one chunk of logits; ``CEWithChunkedOutputLoss`` takes logits the model computed in
sequence chunks (``TransformerDecoder.set_num_output_chunks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusionlm.errors import InvalidInputError


class CEWithChunkedOutputLoss(nn.Module):
    """Mean token cross-entropy over logits split along the sequence.

    Pairs with ``TransformerDecoder.set_num_output_chunks(n)``, whose ``forward`` then returns
    ``n`` chunks ``[b, ~s / n, v]``. Each chunk is upcast to fp32 and reduced on its own, so the
    fp32 copy of the ``[b, s, v]`` logits (and its gradient) never exists whole: with a 49k
    vocabulary that copy is most of a small model's activation memory.

    Args:
        num_output_chunks: how the labels are split; must equal the number of logit chunks.
        ignore_index: label value that contributes no loss (prompt and padding tokens).
    """

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100) -> None:
        super().__init__()
        if num_output_chunks < 1:
            raise InvalidInputError(f"num_output_chunks must be >= 1, got {num_output_chunks}")
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def compute_cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Summed (not averaged) cross-entropy of one chunk.

        Args:
            logits: ``[n, v]`` in any float dtype.
            labels: ``[n]`` targets, ``ignore_index`` where there is none.
        """
        return F.cross_entropy(
            logits.float(), labels, ignore_index=self.ignore_index, reduction="sum"
        )

    def loss_sum(self, logits: Sequence[Tensor] | Tensor, labels: Tensor) -> Tensor:
        """Summed cross-entropy over every labelled token (for token-weighted averaging).

        Args:
            logits: ``num_output_chunks`` tensors ``[b, s_i, v]`` (as ``chunked_output`` makes
                them), or one ``[b, s, v]`` tensor, which is split here.
            labels: ``[b, s]``, already aligned with the logits (label i is the target of
                position i).

        Raises:
            ValueError: a chunk count or sequence length that does not match the labels.
        """
        if isinstance(logits, Tensor):
            logits = logits.tensor_split(self.num_output_chunks, dim=1)
        if len(logits) != self.num_output_chunks:
            raise InvalidInputError(
                f"got {len(logits)} logit chunks, expected num_output_chunks={self.num_output_chunks}"
            )
        label_chunks = labels.tensor_split(self.num_output_chunks, dim=1)
        total = labels.new_zeros((), dtype=torch.float32)
        for chunk, target in zip(logits, label_chunks, strict=True):
            if chunk.shape[:2] != target.shape:
                raise InvalidInputError(
                    f"logit chunk {tuple(chunk.shape)} does not match label chunk {tuple(target.shape)}"
                )
            total = total + self.compute_cross_entropy(
                chunk.reshape(-1, chunk.shape[-1]), target.reshape(-1)
            )
        return total

    def forward(self, logits: Sequence[Tensor] | Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over labelled tokens (0 when no token is labelled).

        Args:
            logits: see ``loss_sum``.
            labels: ``[b, s]``.

        Returns:
            a scalar fp32 tensor.
        """
        count = (labels != self.ignore_index).sum().clamp(min=1)
        return self.loss_sum(logits, labels) / count


class LinearCrossEntropyLoss(nn.Module):
    """Mean token cross-entropy of ``hidden @ weight.T`` without materialising the logits.

    The output projection and the loss run together over chunks of ``chunk_tokens`` tokens.
    When gradients are wanted, each chunk's gradients (with respect to its hidden states, and
    to the output matrix if that is trained) are computed in the forward pass, while the
    chunk's logits are at hand; backward only scales them. So a step holds one chunk's fp32
    logits ``[chunk_tokens, v]`` at a time, not ``[b, s, v]`` logits, their log-softmax and
    their gradient, and the arithmetic is the same as projecting first (no recomputation).

    Under autocast the two matmuls run in the autocast dtype, as ``nn.Linear`` would, and the
    softmax in fp32. Pairs with ``TransformerDecoder.skip_output_layer = True`` (the model
    returns the normed hidden states) and ``set_model_output(model)``.

    Args:
        chunk_tokens: tokens per chunk (0: all at once). 256 keeps the matmuls efficient
            on CPUs while a 49k-vocabulary chunk of fp32 logits stays at 50 MB.
        ignore_index: label value that contributes no loss (prompt and padding tokens).
    """

    def __init__(self, *, chunk_tokens: int = 256, ignore_index: int = -100) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise InvalidInputError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index
        self._output: Callable[[], Tensor] | None = None

    def set_model_output(self, model: nn.Module) -> None:
        """Read the output matrix ``[v, d]`` from ``model.output.weight`` at every call (so a
        tied or sharded weight is the one in use)."""
        self._output = lambda: model.output.weight

    def loss_sum(self, hidden: Tensor, labels: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """Summed (not averaged) cross-entropy over every labelled token.

        Args:
            hidden: ``[b, s, d]`` final (normed) hidden states.
            labels: ``[b, s]``, label i the target of position i; ``ignore_index`` for none.
            weight: the output matrix ``[v, d]``; default the model's (``set_model_output``).

        Returns:
            a scalar fp32 tensor.

        Raises:
            ValueError: hidden states and labels of different shapes, or a width that is not
                the output matrix's.
            RuntimeError: no weight given and ``set_model_output`` not called.
        """
        if weight is None:
            if self._output is None:
                raise RuntimeError("call set_model_output(model) or pass weight=")
            weight = self._output()
        if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
            raise InvalidInputError(
                f"hidden states {tuple(hidden.shape)}, labels {tuple(labels.shape)} and output "
                f"matrix {tuple(weight.shape)} do not fit: expected [b, s, d], [b, s], [v, d]"
            )
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        return _LinearCrossEntropy.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            self.ignore_index,
            self.chunk_tokens,
            compute_dtype,
        )

    def forward(self, hidden: Tensor, labels: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """Mean cross-entropy over labelled tokens (0 when no token is labelled); see
        ``loss_sum``."""
        count = (labels != self.ignore_index).sum().clamp(min=1)
        return self.loss_sum(hidden, labels, weight=weight) / count


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T``, gradients computed chunk by chunk in
    forward. hidden ``[n, d]``, weight ``[v, d]``, labels ``[n]``."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ignore_index: int,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
        total = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=softmax_dtype) if wants_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            step = chunk_tokens or max(1, hidden.shape[0])
            for start in range(0, hidden.shape[0], step):
                h = hidden[start : start + step].to(compute_dtype)
                target = labels[start : start + step]
                logits = (h @ w.T).to(softmax_dtype)  # [c, v]
                labelled = target != ignore_index
                picked = target.clamp(min=0)[:, None]
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, picked)[:, 0]) * labelled).sum()
                if not (wants_hidden or wants_weight):
                    continue
                # d(loss)/d(logits) = softmax - onehot, zero on unlabelled rows; in place.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
                grad.mul_(labelled[:, None])
                grad = grad.to(compute_dtype)
                if wants_hidden:
                    grad_hidden[start : start + step] = grad @ w
                if wants_weight:
                    grad_weight.add_(grad.T @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


__all__ = ["CEWithChunkedOutputLoss", "LinearCrossEntropyLoss"]
