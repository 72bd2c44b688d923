"""Streaming decode: token ids in one at a time, text out as soon as it is whole."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tokenizers import Tokenizer as _Backend


def decode_ids(
    backend: _Backend,
    ids: Sequence[int],
    *,
    skip_special_tokens: bool,
    verbatim: Mapping[int, str],
) -> str:
    """``backend``'s decode of ``ids``, except that the ids in ``verbatim`` give their text
    as it is (user-defined tokens of a byte-level vocabulary, such as deepseek's single
    characters, which the byte-level decoder would read as bytes), as llama.cpp renders them."""
    if not verbatim or not any(i in verbatim for i in ids):
        return backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    parts: list[str] = []
    run: list[int] = []
    for i in ids:
        if i in verbatim:
            parts += [backend.decode(run, skip_special_tokens=skip_special_tokens), verbatim[i]]
            run = []
        else:
            run.append(i)
    parts.append(backend.decode(run, skip_special_tokens=skip_special_tokens))
    return "".join(parts)


class StreamDecoder:
    """Incremental decoding: ``push`` one id, get the text it completes.

    Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD at the end) or in a
    byte-fallback token whose character may continue, so a chunk never holds a split character.
    The chunks of a stream, ``flush()`` included, concatenate to ``decode`` of all pushed ids.

    Each push re-decodes only the ids since the previous chunk plus the ids of that chunk (the
    context decoders such as sentencepiece's leading-space strip need), so the cost per token does
    not grow with the length of the stream.

    tokenizers' own ``decoders.DecodeStream`` does not serve here: it emits "中" of a byte run
    <E4><B8><AD><FF> before the invalid byte turns the whole run into U+FFFDs, then raises.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        skip_special_tokens: bool = False,
        byte_ids: frozenset[int] = frozenset(),
        verbatim: Mapping[int, str] | None = None,
    ) -> None:
        """``byte_ids``: ids of ``<0xNN>`` tokens that ``backend``'s decoder turns into raw
        bytes; ``verbatim``: tokens decoded as their text (``decode_ids``)."""
        self._backend = backend
        self._skip = skip_special_tokens
        self._byte_ids = byte_ids
        self._verbatim = dict(verbatim or {})
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._prefix = 0  # _ids[_prefix:_read] were emitted in the last chunk: decoding context
        self._read = 0  # _ids[_read:] are not emitted yet
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(
            self._backend, ids, skip_special_tokens=self._skip, verbatim=self._verbatim
        )

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes (often "", never a partial character)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._byte_ids:
            # A run of <0xNN> tokens decodes as one unit; wait until it ends.
            return ""
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text) :]
        # The ids of this chunk become the context of the next; older ids are no longer needed.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """The held-back rest (possibly with U+FFFD for bytes that never completed a character);
        the decoder then starts a new stream."""
        text = self._decode(self._ids[self._prefix :])
        rest = text[len(self._prefix_text) :]
        self._reset()
        return rest


def byte_fallback_ids(backend: _Backend) -> frozenset[int]:
    """Ids of ``<0xNN>`` tokens when the decoder turns them into raw bytes, else empty."""
    decoder = backend.decoder
    if decoder is None or b"ByteFallback" not in decoder.__getstate__():
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(
        i
        for tok, i in vocab.items()
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">")
    )


__all__ = ["StreamDecoder", "byte_fallback_ids", "decode_ids"]
