"""Training data: JSONL examples -> token documents -> packed fixed-length rows -> batches.

A *document* is one example's tokens and labels, aligned: ``labels[i]`` is the token the
model should predict after position ``i``, or ``IGNORE_INDEX`` (prompt tokens, the last
position, padding). Shifting inside each document, before packing, keeps a row's next
document from becoming the target of the previous one's last token.

Packed rows carry, per slot, the document it belongs to and its position inside it, so a row
of several documents computes exactly what each document alone would: attention stays inside
a document (``and_masks(causal(), document(ids))``) and RoPE positions restart at 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionlm.errors import InvalidInputError
from fusionlm.modules.masks import (
    AttentionMask,
    and_masks,
    causal,
    document,
    to_block_mask,
    to_bool_mask,
)
from fusionlm.tokenizer import Tokenizer

IGNORE_INDEX = -100
FORMATS = ('{"messages": [{"role": ..., "content": ...}, ...]}', '{"prompt": ..., "response": ...}')
FORMATS += ('{"text": ...}',)


@dataclasses.dataclass(frozen=True)
class Document:
    """One example: ``tokens`` and the aligned ``labels`` (see the module docstring)."""

    tokens: list[int]
    labels: list[int]
    line: int


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """``n`` rows of ``seq_len`` slots; every field is an int64 tensor ``[n, seq_len]``.

    ``document_ids`` number the documents of a row from 0; padding slots are -1, a "document"
    of their own, so they never mix with real tokens. ``positions`` restart at 0 for every
    document.
    """

    tokens: Tensor
    labels: Tensor
    positions: Tensor
    document_ids: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: Tensor) -> Batch:
        """The rows at ``index`` (``[b]``) as a ``Batch``."""
        return Batch(
            tokens=self.tokens[index],
            labels=self.labels[index],
            positions=self.positions[index],
            document_ids=self.document_ids[index],
        )

    def fingerprint(self) -> str:
        """A short hash of the rows' tokens and labels (tells a changed dataset on resume)."""
        digest = hashlib.sha256()
        for t in (self.tokens, self.labels):
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Batch:
    """``[b, s]`` tensors of a micro-batch; see ``PackedRows``."""

    tokens: Tensor
    labels: Tensor
    positions: Tensor
    document_ids: Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def num_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int((self.document_ids >= 0).sum())

    def attention_mask(self, backend: str) -> AttentionMask:
        """Causal attention within each document: a ``BlockMask`` for ``flex``, else bool."""
        b, s = self.tokens.shape
        predicate = and_masks(causal(), document(self.document_ids))
        if backend == "flex":
            return to_block_mask(
                predicate, batch_size=b, q_len=s, kv_len=s, device=self.tokens.device
            )
        return to_bool_mask(predicate, batch_size=b, q_len=s, kv_len=s, device=self.tokens.device)


# --------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object (its number is in the message), or a file
            with no examples at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    examples = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInputError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidInputError(
                    f"{path}:{number}: malformed JSON: {e.msg} (column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise InvalidInputError(
                    f"{path}:{number}: expected a JSON object, got {type(obj).__name__}; "
                    f"each line is one of {', '.join(FORMATS)}"
                )
            examples.append((number, obj))
    if not examples:
        raise InvalidInputError(f"data file {path} holds no examples")
    return examples


def tokenize_example(
    example: Mapping[str, Any], tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    """Tokens of one example and, per token, whether the model is trained to produce it.

    ``messages`` and ``prompt``/``response`` go through the chat template (plain concatenation
    without one); only assistant turns are trained. ``text`` is trained on every token.

    Raises:
        ValueError: not exactly one format, wrong field types, nothing to train on.
    """
    formats = [key for key in ("messages", "prompt", "text") if key in example]
    if "response" in example and "prompt" not in example:
        raise InvalidInputError("has 'response' without 'prompt'")
    if len(formats) != 1:
        found = formats or sorted(example)
        raise InvalidInputError(f"needs exactly one of {', '.join(FORMATS)}; found keys {found}")
    if "text" in example:
        text = _string(example, "text")
        ids = tokenizer.encode(text)
        if tokenizer.eos_id is not None and (not ids or ids[-1] != tokenizer.eos_id):
            ids.append(tokenizer.eos_id)
        return ids, [True] * len(ids)
    if "prompt" in example:
        if "response" not in example:
            raise InvalidInputError("has 'prompt' without 'response'")
        system = example.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidInputError(f"'system' must be a string, got {type(system).__name__}")
        prompt, response = _string(example, "prompt"), _string(example, "response")
        if not tokenizer.is_chat:
            ids = tokenizer.encode((system + "\n\n" if system else "") + prompt)
            answer = tokenizer.encode(response, add_special_tokens=False)
            if tokenizer.eos_id is not None:
                answer.append(tokenizer.eos_id)
            return ids + answer, [False] * len(ids) + [True] * len(answer)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
    else:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError(
                "'messages' must be a non-empty list of {role, content} objects"
            )
        if not tokenizer.is_chat:
            raise InvalidInputError("'messages' need a tokenizer with a chat template")
    return _tokenize_chat(messages, tokenizer)


def _string(example: Mapping[str, Any], key: str) -> str:
    value = example[key]
    if not isinstance(value, str):
        raise InvalidInputError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _tokenize_chat(messages: list[Any], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Render with the template and cut the text at assistant turns.

    An assistant turn's text is what ``messages[:i + 1]`` renders beyond ``messages[:i]`` with the
    generation prompt: the reply and its end-of-turn marker. Each piece is encoded on its own, so
    the prompt's tokens are exactly those generation would see.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInputError(
                f"messages[{i}] must be an object, got {type(message).__name__}"
            )
    assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not assistant:
        raise InvalidInputError("has no assistant message to train on")
    if assistant[0] == 0:
        raise InvalidInputError("starts with an assistant message; put a user message before it")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i in assistant:
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= done):
            raise InvalidInputError(
                "the chat template does not render conversations as growing prefixes, so the "
                "assistant turns cannot be located"
            )
        pieces += [(full[done : len(before)], False), (full[len(before) : len(after)], True)]
        done = len(after)
    pieces.append((full[done:], False))
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in pieces:
        if text:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            trained += [train] * len(piece)
    return ids, trained


def load_documents(
    path: str | os.PathLike[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    truncate: bool = False,
) -> tuple[list[Document], int]:
    """Every example of a JSONL file as a ``Document``; also the number truncated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a bad line, naming ``path:line``: malformed JSON, an unknown format, no
            response tokens, or (without ``truncate``) more than ``seq_len`` tokens.
    """
    documents = []
    truncated = 0
    for number, example in read_jsonl(path):
        try:
            ids, trained = tokenize_example(example, tokenizer)
        except ValueError as e:
            raise InvalidInputError(f"{path}:{number}: {e}") from None
        if len(ids) > seq_len:
            if not truncate:
                raise InvalidInputError(
                    f"{path}:{number}: {len(ids)} tokens do not fit seq_len={seq_len}; "
                    "raise seq_len or set truncate=true"
                )
            ids, trained = ids[:seq_len], trained[:seq_len]
            truncated += 1
        labels = [
            t if train else IGNORE_INDEX for t, train in zip(ids[1:], trained[1:], strict=True)
        ]
        labels.append(IGNORE_INDEX)
        if all(label == IGNORE_INDEX for label in labels):
            reason = " after truncation" if len(ids) == seq_len and truncated else ""
            raise InvalidInputError(f"{path}:{number}: no token to train on{reason}")
        documents.append(Document(tokens=ids, labels=labels, line=number))
    return documents, truncated


# --------------------------------------------------------------------------- packing


def pack_documents(
    documents: Sequence[Document], *, seq_len: int, pad_id: int, packing: bool = True
) -> PackedRows:
    """Put documents, in order, into rows of ``seq_len`` slots.

    With ``packing``, a document goes into the current row if it fits and starts a new row
    otherwise (documents are never split, so each is seen whole); without, every document
    has its own row. The rest of a row is padding: ``pad_id`` tokens, no labels.

    Raises:
        ValueError: a document longer than ``seq_len``, or no documents.
    """
    if not documents:
        raise InvalidInputError("no documents to pack")
    rows: list[list[Document]] = []
    used = seq_len + 1
    for doc in documents:
        if len(doc.tokens) > seq_len:
            raise InvalidInputError(
                f"line {doc.line}: {len(doc.tokens)} tokens exceed seq_len={seq_len}"
            )
        if not packing or used + len(doc.tokens) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(doc)
        used += len(doc.tokens)
    n = len(rows)
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, seq_len), dtype=torch.long)
    document_ids = torch.zeros((n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, doc in enumerate(row):
            end = start + len(doc.tokens)
            tokens[r, start:end] = torch.tensor(doc.tokens)
            labels[r, start:end] = torch.tensor(doc.labels)
            positions[r, start:end] = torch.arange(len(doc.tokens))
            document_ids[r, start:end] = d
            start = end
        positions[r, start:] = torch.arange(seq_len - start)
        document_ids[r, start:] = -1
    return PackedRows(tokens=tokens, labels=labels, positions=positions, document_ids=document_ids)


# --------------------------------------------------------------------------- order and sharding


class StepSampler:
    """Which rows each process reads at each optimizer step; a pure function of the step.

    Epochs are concatenated seeded permutations of the rows; step ``t`` takes global rows
    ``[t·G, (t+1)·G)`` with ``G = batch_size · accumulation · world_size``, and process ``r``
    the ``r``-th contiguous slice of them. The rows a step sees therefore do not depend on how
    ``G`` is split over processes, and resuming at step ``t`` needs only ``t``.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        batch_size: int,
        accumulation: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    def steps_for_epochs(self, epochs: int) -> int:
        return max(1, -(-epochs * self.num_rows // self.global_batch))

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._orders[epoch] = torch.randperm(self.num_rows, generator=gen)
            else:
                self._orders[epoch] = torch.arange(self.num_rows)
            self._orders.pop(epoch - 2, None)
        return self._orders[epoch]

    def micro_batches(self, step: int, rank: int) -> Iterator[Tensor]:
        """Row indices ``[batch_size]`` of each micro-batch of process ``rank`` at ``step``."""
        per_rank = self.batch_size * self.accumulation
        start = step * self.global_batch + rank * per_rank
        rows = torch.stack(
            [
                self._order(g // self.num_rows)[g % self.num_rows]
                for g in range(start, start + per_rank)
            ]
        )
        yield from rows.split(self.batch_size)


def shard_for_eval(num_rows: int, *, batch_size: int, rank: int, world_size: int) -> list[Tensor]:
    """Row indices of each evaluation batch of process ``rank``; -1 marks a filler row.

    Every process gets the same number of batches (sharded models run collectives in every
    forward), so the last ones are padded with fillers that carry no labels.
    """
    per_step = batch_size * world_size
    total = -(-num_rows // per_step) * per_step
    index = torch.arange(total)
    index[num_rows:] = -1
    mine = index.view(-1, world_size, batch_size)[:, rank]
    return list(mine)


def select_rows(rows: PackedRows, index: Tensor) -> Batch:
    """Rows at ``index``; -1 entries become copies of row 0 with every label ignored."""
    batch = rows.select(index.clamp(min=0))
    filler = (index < 0).unsqueeze(1)
    if filler.any():
        batch = dataclasses.replace(batch, labels=batch.labels.masked_fill(filler, IGNORE_INDEX))
    return batch


__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Document",
    "PackedRows",
    "StepSampler",
    "load_documents",
    "pack_documents",
    "read_jsonl",
    "select_rows",
    "shard_for_eval",
    "tokenize_example",
]
