"""Cross-entropy over chunked logits: upcast to fp32 one sequence chunk at a time."""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["CEWithChunkedOutputLoss"]
