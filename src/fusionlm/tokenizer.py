"""Tokenizer over the ``tokenizers`` library, built from a GGUF's metadata or a transformers directory.

A GGUF carries no ``tokenizer.json``: its vocabulary, merges, token types and flags are metadata
under llama.cpp's key names. We rebuild the ``tokenizers`` pipeline those describe:

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE. How text is cut before BPE depends on the
  vocabulary (``tokenizer.ggml.pre``); each name maps to llama.cpp's split rule for it (table
  ``_PRE_TOKENIZERS``). An unknown name is an error rather than a silently different tokenization.
* ``tokenizer.ggml.model = "llama"``: a sentencepiece vocabulary. Its BPE merges are the file's,
  or recovered from the token scores, and bytes that are not tokens fall back to ``<0xNN>``.

Control tokens (token type 3) become special tokens and user-defined ones (type 4) plain added
tokens, so neither is ever split. Chat templates run in jinja2's immutable sandbox with the
helpers transformers gives them (``raise_exception``, ``strftime_now``, a non-escaping ``tojson``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from fusionlm.errors import InvalidInputError
from fusionlm.files import atomic_write_text, read_json_object

__all__ = ["StreamDecoder", "Tokenizer"]

# llama.cpp's token types (``llama_token_type``) as stored in ``tokenizer.ggml.token_type``.
_CONTROL = 3
_USER_DEFINED = 4

# Tokens that end a turn or a generation when the vocabulary has them as special tokens: llama.cpp's
# end-of-generation ("EOG") list, plus ``</s>``.
_EOG_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<EOT>",
    "</s>",
)

_SPIECE_SPACE = "\u2581"

# --- pre-tokenizers of byte-level vocabularies ------------------------------------------------

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How one family of byte-level vocabularies cuts text before BPE.

    ``split`` is the regex of the cut; None means GPT-2's, which ``ByteLevel`` applies itself.
    ``digits`` isolates every numeric character first (llama.cpp's extra ``\\p{N}`` pass).
    ``ignore_merges`` and ``add_bos`` are the flags llama.cpp sets for the name; ``add_bos`` is
    only the default for files without ``tokenizer.ggml.add_bos_token``.
    """

    split: str | None = None
    digits: bool = False
    ignore_merges: bool = False
    add_bos: bool = False

    def build(self) -> pre_tokenizers.PreTokenizer:
        if self.split is None:
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            if not self.digits:
                return byte_level
            return pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        steps: list[pre_tokenizers.PreTokenizer] = [
            pre_tokenizers.Split(Regex(self.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        if self.digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return pre_tokenizers.Sequence(steps)


_GPT2 = _PreTokenizer()
_STARCODER = _PreTokenizer(digits=True)
_LLAMA3 = _PreTokenizer(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer(_QWEN2_SPLIT)
_GPT4O = _PreTokenizer(_GPT4O_SPLIT)

# ``tokenizer.ggml.pre`` -> split rule; names grouped as llama.cpp groups them (llama-vocab.cpp).
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # llama.cpp's "default" is a rough guess for files that predate the key; GPT-2's split is what
    # transformers uses for them, and the closer of the two to most such vocabularies.
    "default": _GPT2,
    "gpt-2": _GPT2,
    "phi-2": _GPT2,
    "mpt": _GPT2,
    "olmo": _GPT2,
    "jais": _GPT2,
    "trillion": _GPT2,
    "granite-docling": _GPT2,
    "exaone4": _GPT2,
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "falcon-h1": _LLAMA3,
    "pixtral": _LLAMA3,
    "midm-2.0": _LLAMA3,
    "lfm2": _LLAMA3,
    "jina-v5-nano": _LLAMA3,
    "dbrx": _PreTokenizer(_LLAMA3_SPLIT),
    "smaug-bpe": _PreTokenizer(_LLAMA3_SPLIT),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "kormo": _QWEN2,
    "f2llmv2": _QWEN2,
    "megrez": _QWEN2,
    "stablelm2": _QWEN2,
    "qwen35": _PreTokenizer(_QWEN35_SPLIT),
    "tekken": _PreTokenizer(_TEKKEN_SPLIT, ignore_merges=True, add_bos=True),
    "gpt-4o": _GPT4O,
    "llama4": _GPT4O,
    "kanana2": _GPT4O,
    "talkie": _GPT4O,
    "minimax-m2": _GPT4O,
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: byte-level BPE vocabularies are written in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


# --- building from GGUF metadata ----------------------------------------------------------------


def _byte_level_backend(tokens: list[str], merges: list[tuple[str, str]], pre: str) -> _Backend:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A few converters store tokens as text rather than in the byte alphabet; respell those.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    rule = _PRE_TOKENIZERS[pre]
    backend = _Backend(
        _bpe(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=rule.ignore_merges,
        )
    )
    backend.pre_tokenizer = rule.build()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], merges: list[tuple[str, str]], *, add_space_prefix: bool, phi3: bool
) -> _Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = _Backend(
        _bpe(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    if phi3:
        # Phi-3 writes its prefix space with a normalizer: "  hi" -> "▁▁▁hi", where Metaspace
        # would give "▁▁hi".
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPIECE_SPACE,
            prepend_scheme="first" if add_space_prefix else "never",
            split=False,
        )
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _bpe(**options: Any) -> models.BPE:
    """tokenizers' BPE model; a vocabulary it refuses (a merge of tokens it does not hold) is
    the file's mistake, said as one."""
    try:
        return models.BPE(**options)
    except Exception as e:  # tokenizers raises a bare Exception
        raise InvalidInputError(f"the GGUF vocabulary is inconsistent: {e}") from None


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """The BPE merges a sentencepiece vocabulary implies: every split of a token into two tokens,
    best score first; ties go to the longer left part, then the longer right part, then file
    order (the order transformers' converter gives them)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    candidates = [
        (tok[:k], tok[k:], score)
        for tok, score in dict(zip(tokens, scores, strict=True)).items()
        for k in range(1, len(tok))
        if tok[:k] in vocab and tok[k:] in vocab
    ]
    candidates.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)  # stable
    return [(left, right) for left, right, _ in candidates]


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = str(merge).split(" ")
        if len(parts) != 2:
            raise InvalidInputError(f"malformed GGUF merge {merge!r}: expected two tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --- chat templates -----------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's text with it
    for training masks. We only render, so the block renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, refusing unsafe attribute access outright (jinja2's own
    gives an undefined value that prints as nothing, so a probing template would render)."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"a chat template may not read {attribute!r} of a {type(obj).__name__}")


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise InvalidInputError(f"chat template does not compile: {e}") from e


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made of JSON types only, so a template sees data, never objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # Subclasses (enums, numpy floats) carry methods a template should not reach.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise InvalidInputError(
        f"{where} is a {type(value).__name__}; messages hold JSON-like data only"
    )


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidInputError(f"messages[{i}] is a {type(message).__name__}, not a dict")
        # As transformers does: a None value means "absent" (OpenAI-style content=None).
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise InvalidInputError(f"messages[{i}] needs a str 'role', got {message!r:.80}")
        content = message.get("content")
        if content is None and "tool_calls" not in message:
            raise InvalidInputError(f"messages[{i}] has no 'content'")
        if content is not None and not isinstance(content, str | list):
            raise InvalidInputError(
                f"messages[{i}]['content'] must be a str (or a list of parts), "
                f"got {type(content).__name__}"
            )
        checked.append(_plain(message, f"messages[{i}]"))
    return checked


# --- reading transformers files -----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` if the directory has no such file."""
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a str or a serialized AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any) -> str | None:
    """``chat_template`` is a str, or a list of named templates of which we use "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


# --- the tokenizer ------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, chat templates and streaming decode for one vocabulary.

    Build with :meth:`from_gguf_metadata` or :meth:`from_dir`. Attributes: ``vocab_size`` (ids
    run ``0..vocab_size-1``), ``bos_id``/``eos_id``/``pad_id`` (None when the model has none),
    ``stop_ids`` (every id that ends a turn or a generation), ``chat_template`` and ``is_chat``.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        extra_stop_ids: Sequence[int] = (),
        model_max_length: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``.

        Args:
            backend: the tokenizers pipeline; its special added tokens are never split.
            bos_token, eos_token, pad_token, unk_token: token texts; one missing from the
                vocabulary counts as absent.
            add_bos, add_eos: whether ``encode(..., add_special_tokens=True)`` adds BOS/EOS. None
                leaves ``backend``'s post-processor in charge (a ``tokenizer.json`` that adds its
                own); a bool replaces it with one that adds exactly these, as transformers does.
            chat_template: jinja2 source, or None.
            extra_stop_ids: ids that also end a generation (``generation_config.json``).
            model_max_length: the longest input the model takes, if known (saved, not enforced).
            vocab_size: the model's vocabulary size, if the backend might under-count it.
        """
        self._backend = backend
        self._tokens: dict[str, str | None] = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "unk_token": unk_token,
            "pad_token": pad_token,
        }
        for key, text in self._tokens.items():
            if text is not None and backend.token_to_id(text) is None:
                self._tokens[key] = None
        self.bos_id = self._id_of("bos_token")
        self.eos_id = self._id_of("eos_token")
        self.pad_id = self._id_of("pad_token")
        self.unk_id = self._id_of("unk_token")
        self._add_bos = add_bos if self.bos_id is not None else (None if add_bos is None else False)
        self._add_eos = add_eos if self.eos_id is not None else (None if add_eos is None else False)
        if self._add_bos is not None or self._add_eos is not None:
            self._set_post_processor(bool(self._add_bos), bool(self._add_eos))
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        stops = {i for i in (backend.token_to_id(t) for t in _EOG_TOKENS) if i in special}
        stops.update(int(i) for i in extra_stop_ids if 0 <= int(i) < self.vocab_size)
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self._byte_ids: frozenset[int] | None = None  # computed on first stream_decoder()

    def _id_of(self, key: str) -> int | None:
        text = self._tokens[key]
        return None if text is None else self._backend.token_to_id(text)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self._tokens["bos_token"], self._tokens["eos_token"]
        first = f"{bos}:0 " if add_bos else ""
        last = f" {eos}:0" if add_eos else ""
        second_first = f" {bos}:1" if add_bos else ""
        second_last = f" {eos}:1" if add_eos else ""
        special = []
        if add_bos:
            special.append((bos, self.bos_id))
        if add_eos:
            special.append((eos, self.eos_id))
        self._backend.post_processor = processors.TemplateProcessing(
            single=f"{first}$A:0{last}",
            pair=f"{first}$A:0{last}{second_first} $B:1{second_last}",
            special_tokens=special,
        )

    # -- construction --

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file's metadata describes (all its key/value fields, decoded).

        Raises:
            ValueError: no or an unsupported ``tokenizer.ggml.model`` (supported: "gpt2",
                "llama") or ``tokenizer.ggml.pre``; missing or inconsistent vocabulary arrays.
        """
        kind = metadata.get("tokenizer.ggml.model")
        if kind is None:
            raise InvalidInputError("GGUF metadata has no tokenizer (no tokenizer.ggml.model)")
        kind = _as_str(kind)
        arch = _as_str(metadata.get("general.architecture", ""))
        if kind not in ("gpt2", "llama"):
            raise InvalidInputError(
                f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE) "
                "and 'llama' (sentencepiece)"
            )
        if "tokenizer.ggml.tokens" not in metadata:
            raise InvalidInputError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens = [_as_str(t) for t in metadata["tokenizer.ggml.tokens"]]
        # Without types every token is an ordinary one.
        types = [int(t) for t in metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)]
        if len(types) != len(tokens):
            raise InvalidInputError(
                f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        merges = metadata.get("tokenizer.ggml.merges")

        def flag(key: str, default: bool) -> bool:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return default if value is None else bool(value)

        if kind == "gpt2":
            pre = _as_str(metadata.get("tokenizer.ggml.pre") or "default")
            if pre not in _PRE_TOKENIZERS:
                raise InvalidInputError(
                    f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                    f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
                )
            if merges is None:
                raise InvalidInputError(
                    "a byte-level (gpt2) GGUF vocabulary needs tokenizer.ggml.merges"
                )
            backend = _byte_level_backend(tokens, _parse_merges(merges), pre)
            add_bos = flag("add_bos_token", _PRE_TOKENIZERS[pre].add_bos)
            alphabet = set(_byte_alphabet().values())
            # A "control" token spelled outside the byte alphabet is a converter mislabel (it
            # would get a new id past the model's vocabulary), so it stays an ordinary token.
            control_ok: Callable[[str], bool] = lambda tok: set(tok) <= alphabet  # noqa: E731
        else:
            # llama.cpp has no pre-tokenizers for sentencepiece vocabularies; a stray
            # tokenizer.ggml.pre is ignored, as it does.
            if arch.startswith("gemma"):
                raise InvalidInputError(
                    f"unsupported GGUF tokenizer: sentencepiece vocabulary of architecture {arch!r}"
                )
            if merges is not None:
                pairs = _parse_merges(merges)
            else:
                scores = metadata.get("tokenizer.ggml.scores")
                if scores is None or len(scores) != len(tokens):
                    raise InvalidInputError(
                        "a sentencepiece (llama) GGUF vocabulary needs tokenizer.ggml.scores "
                        "(one per token) or tokenizer.ggml.merges"
                    )
                pairs = _merges_from_scores(tokens, [float(s) for s in scores])
            backend = _sentencepiece_backend(
                tokens,
                pairs,
                add_space_prefix=flag("add_space_prefix", True),
                phi3=arch == "phi3",
            )
            add_bos = flag("add_bos_token", True)
            control_ok = lambda tok: True  # noqa: E731

        control = [
            AddedToken(tok, normalized=False, special=True)
            for tok, t in zip(tokens, types, strict=True)
            if t == _CONTROL and control_ok(tok)
        ]
        if control:
            backend.add_special_tokens(control)
        user = [
            AddedToken(tok, normalized=False, special=False)
            for tok, t in zip(tokens, types, strict=True)
            if t == _USER_DEFINED
        ]
        if user:
            backend.add_tokens(user)

        def token(key: str) -> str | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            return (
                tokens[int(value)] if value is not None and 0 <= int(value) < len(tokens) else None
            )

        named = {
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
        }
        # The model's named special tokens are special even when the file types them otherwise.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in named.values() if t is not None and t not in added]
        if missing:
            backend.add_special_tokens(
                [AddedToken(t, normalized=False, special=True) for t in missing]
            )
        context = metadata.get(f"{arch}.context_length")
        template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            **named,
            add_bos=add_bos,
            add_eos=flag("add_eos_token", False),
            chat_template=None if template is None else _as_str(template),
            model_max_length=None if context is None else int(context),
            vocab_size=len(tokens),
        )

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        """Load a transformers tokenizer directory.

        Reads ``tokenizer.json``; ``tokenizer_config.json`` (special tokens, ``add_bos_token``,
        ``add_eos_token``, ``chat_template``, ``model_max_length``), ``chat_template.jinja``,
        ``special_tokens_map.json`` and ``generation_config.json`` (extra stop ids) if present.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``directory``.
            ValueError: a file that does not parse.
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise InvalidInputError(f"cannot read {path}: {e}") from e
        try:
            config = _read_json(directory / "tokenizer_config.json")
            special_map = _read_json(directory / "special_tokens_map.json")
            generation = _read_json(directory / "generation_config.json")
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"malformed JSON in {directory}: {e}") from e

        named = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            named[key] = _token_text(config.get(key, special_map.get(key)))

        template_file = directory / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
            if template is None:
                template = _pick_template(
                    _read_json(directory / "chat_template.json").get("chat_template")
                )

        eos_ids = generation.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or ())
        if named["eos_token"] is None and eos_ids:
            named["eos_token"] = backend.id_to_token(int(eos_ids[0]))

        explicit = "add_bos_token" in config or "add_eos_token" in config
        max_length = config.get("model_max_length")
        return cls(
            backend,
            **named,
            add_bos=bool(config.get("add_bos_token", False)) if explicit else None,
            add_eos=bool(config.get("add_eos_token", False)) if explicit else None,
            chat_template=template,
            extra_stop_ids=[int(i) for i in eos_ids],
            # transformers writes 1e30 for "no limit"
            model_max_length=int(max_length)
            if isinstance(max_length, int | float) and max_length < 1e12
            else None,
        )

    # -- text <-> ids --

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token text in it (``<|im_start|>``) becomes that token.

        ``add_special_tokens`` adds BOS (and EOS) where the model's tokenizer config says to.

        Raises:
            TypeError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; bytes that do not form whole UTF-8 characters become U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time whose outputs concatenate to ``decode(ids)``."""
        if self._byte_ids is None:
            self._byte_ids = _byte_fallback_ids(self._backend)
        return StreamDecoder(
            self._backend, skip_special_tokens=skip_special_tokens, byte_ids=self._byte_ids
        )

    # -- chat --

    @property
    def is_chat(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the model's chat template.

        ``messages`` is a list of ``{"role": ..., "content": ...}`` dicts. The template also sees
        ``add_generation_prompt`` and the model's ``bos_token``/``eos_token``/``unk_token``/
        ``pad_token`` texts. Encode the result with ``add_special_tokens=False``: templates write
        their own BOS.

        Raises:
            ValueError: no chat template; malformed ``messages``; the template fails (its message,
                e.g. from ``raise_exception``, is in the error).
        """
        if self.chat_template is None:
            raise InvalidInputError("this tokenizer has no chat template")
        checked = _check_messages(messages)
        template = _compile_template(self.chat_template)
        context = {k: v for k, v in self._tokens.items() if v is not None}
        try:
            return template.render(
                messages=checked,
                add_generation_prompt=bool(add_generation_prompt),
                tools=None,
                documents=None,
                **context,
            )
        except jinja2.TemplateError as e:
            raise InvalidInputError(f"chat template error: {e}") from e
        except (TypeError, ArithmeticError, LookupError, AttributeError, ValueError) as e:
            # Python errors raised by template code (e.g. "str" + None) are template errors too.
            raise InvalidInputError(f"chat template error: {type(e).__name__}: {e}") from e

    # -- saving --

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        ``transformers.AutoTokenizer.from_pretrained(directory)`` and :meth:`from_dir` load them
        back with identical encoding, decoding and chat template.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokens = {k: v for k, v in self._tokens.items() if v is not None}
        config: dict[str, Any] = {
            # The generic class keeps tokenizer.json as it is; a model-specific one would rebuild
            # the pipeline from its own defaults.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "clean_up_tokenization_spaces": False,
        }
        if self._add_bos is not None or self._add_eos is not None:
            config["add_bos_token"] = bool(self._add_bos)
            config["add_eos_token"] = bool(self._add_eos)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / "tokenizer.json", self._backend.to_str(pretty=True))
        atomic_write_text(
            directory / "tokenizer_config.json",
            json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        )
        atomic_write_text(
            directory / "special_tokens_map.json",
            json.dumps(tokens, indent=2, ensure_ascii=False) + "\n",
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"stop_ids={sorted(self.stop_ids)}, is_chat={self.is_chat})"
        )


class StreamDecoder:
    """Incremental decoding: ``push`` one id, get the text it completes.

    Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD at the end) or in a
    byte-fallback token whose character may continue, so a chunk never holds a split character.
    The chunks of a stream, ``flush()`` included, concatenate to ``decode`` of all pushed ids.

    Each push re-decodes only the ids since the previous chunk plus the ids of that chunk (the
    context decoders such as sentencepiece's leading-space strip need), so the cost per token does
    not grow with the length of the stream.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        skip_special_tokens: bool = False,
        byte_ids: frozenset[int] = frozenset(),
    ) -> None:
        """``byte_ids``: ids of ``<0xNN>`` tokens that ``backend``'s decoder turns into raw bytes."""
        self._backend = backend
        self._skip = skip_special_tokens
        self._byte_ids = byte_ids
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = []
        self._prefix = 0  # _ids[_prefix:_read] were emitted in the last chunk: decoding context
        self._read = 0  # _ids[_read:] are not emitted yet
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

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


def _byte_fallback_ids(backend: _Backend) -> frozenset[int]:
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
