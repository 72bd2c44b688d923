"""Model quality measures: perplexity on a text."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fusionlm.errors import InvalidInputError
from fusionlm.modules.decoder import TransformerDecoder


def perplexity(model: TransformerDecoder, ids: Sequence[int], *, window: int = 512) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``ids``.

    The text is cut into consecutive windows of ``window`` tokens; each window is scored on
    its own (no context carried across windows), so the figure depends only on the text, the
    model and ``window``.

    Raises:
        ValueError: fewer than two tokens, or a window outside ``[2, model.max_seq_len]``.
    """
    if len(ids) < 2:
        raise InvalidInputError("perplexity needs a text of at least two tokens")
    if not 2 <= window <= model.max_seq_len:
        raise InvalidInputError(f"window must be in [2, {model.max_seq_len}], got {window}")
    tokens = torch.tensor(list(ids), dtype=torch.long)
    total_nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start : start + window][None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk)[0, :-1].float()
            total_nll += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total_nll / count)


__all__ = ["perplexity"]
