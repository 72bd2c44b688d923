"""Tokenizers rebuilt from GGUF metadata: a GGUF file carries no ``tokenizer.json``; its
vocabulary, merges, token types and flags are metadata under llama.cpp's key names.

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE. How text is cut before BPE depends on the
  vocabulary (``tokenizer.ggml.pre``); each name maps to llama.cpp's split rule for it (table
  ``_PRE_TOKENIZERS``). An unknown name is an error rather than a silently different tokenization.
* ``tokenizer.ggml.model = "llama"``: a sentencepiece vocabulary. Its BPE merges are the file's,
  or recovered from the token scores, and bytes that are not tokens fall back to ``<0xNN>``.

Control tokens (token type 3) become special tokens and user-defined ones (type 4) plain added
tokens, so neither is ever split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from fusionlm.errors import InvalidInputError

# llama.cpp's token types (``llama_token_type``) as stored in ``tokenizer.ggml.token_type``.
_CONTROL = 3
_USER_DEFINED = 4

_SPIECE_SPACE = "\u2581"

# Vocabularies that end turns with one of these keep "</s>" an ordinary token (Gemma 4,
# PLaMo), where llama.cpp otherwise makes it a control token by its text.
_NORMAL_S_MARKERS = frozenset({"<|tool_response>", "<|plamo:eos|>"})

# Tokens llama.cpp makes control tokens by their text whatever their type (end of turn or of
# generation, fill-in-the-middle markers; llama-vocab.cpp), so text spelling them is that token.
_CONTROL_LOOKING = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
        "<|eom_id|>",
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
        "<|fim_pad|>",
        "<fim-pad>",
        "<fim_pad>",
        "<PAD>",
        "[PAD]",
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
        "<|file_sep|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "</s>",
        "[EOS]",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "[e~[",
    }
)

# -- pre-tokenizers of byte-level vocabularies ------------------------------------------------

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

# llama.cpp's rules of several regexes, each cutting the pieces the previous one left
# (llama-vocab.cpp); the letter and punctuation ranges are theirs, character for character.
_DEEPSEEK_LLM_SPLITS = (
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK_CODER_SPLITS = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[一-龥ࠀ-一가-\ud7ff]+",
    "\\p{N}",
)
_DEFAULT_SPLITS = (  # for files without tokenizer.ggml.pre
    "[\\p{P}\\$\\+<=>\\^~\\|]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "\\p{N}+",
    "[0-9][0-9][0-9]",
)
_FALCON_SPLITS = (
    "[\\p{P}\\$\\+<=>\\^~\\|`]+",
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    "[0-9][0-9][0-9]",
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How one family of byte-level vocabularies cuts text before BPE.

    ``splits`` are the regexes of the cut, applied in turn, each isolating its matches within
    the pieces the previous ones left (llama.cpp's ``unicode_regex_split``); none means GPT-2's,
    which ``ByteLevel`` applies itself. ``digits`` isolates every numeric character first
    (llama.cpp's extra ``\\p{N}`` pass).
    ``ignore_merges`` and ``add_bos`` are the flags llama.cpp sets for the name; ``add_bos`` is
    only the default for files without ``tokenizer.ggml.add_bos_token``.
    """

    splits: tuple[str, ...] = ()
    digits: bool = False
    ignore_merges: bool = False
    add_bos: bool = False

    def build(self) -> pre_tokenizers.PreTokenizer:
        if not self.splits:
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            if not self.digits:
                return byte_level
            return pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        steps: list[pre_tokenizers.PreTokenizer] = [
            *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in self.splits),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        if self.digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        return pre_tokenizers.Sequence(steps)


_GPT2 = _PreTokenizer()
_STARCODER = _PreTokenizer(digits=True)
_LLAMA3 = _PreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_SPLIT,))
_GPT4O = _PreTokenizer((_GPT4O_SPLIT,))

# ``tokenizer.ggml.pre`` -> split rule; names grouped as llama.cpp groups them (llama-vocab.cpp).
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    # Files that predate the key: llama.cpp's rule for them (transformers uses GPT-2's).
    "default": _PreTokenizer(_DEFAULT_SPLITS),
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
    "dbrx": _PreTokenizer((_LLAMA3_SPLIT,)),
    "smaug-bpe": _PreTokenizer((_LLAMA3_SPLIT,)),
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "kormo": _QWEN2,
    "f2llmv2": _QWEN2,
    "megrez": _QWEN2,
    "stablelm2": _QWEN2,
    "qwen35": _PreTokenizer((_QWEN35_SPLIT,)),
    "tekken": _PreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    "deepseek-llm": _PreTokenizer(_DEEPSEEK_LLM_SPLITS),
    "deepseek-coder": _PreTokenizer(_DEEPSEEK_CODER_SPLITS),
    "falcon": _PreTokenizer(_FALCON_SPLITS),
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


# -- pipelines


def _byte_level_backend(
    tokens: list[str], types: list[int], merges: list[tuple[str, str]], pre: str
) -> _Backend:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # A few converters store tokens as text rather than in the byte alphabet; respell those,
    # except user-defined tokens (GPT-NeoX's runs of spaces): those are matched as text before
    # the split, as llama.cpp matches them, so they keep their spelling and their ids.
    vocab = {
        tok
        if set(tok) <= alphabet or kind == _USER_DEFINED
        else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
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
    tokens: list[str], merges: list[tuple[str, str]], *, add_space_prefix: bool
) -> _Backend:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = _Backend(
        _bpe(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    # llama.cpp writes a space before the text, and again after every special token
    # (add_space_prefix), then every space as "▁"; Metaspace would skip the prefix where the
    # text already starts with a space (" " gives "▁", where llama.cpp has "▁▁").
    steps = [normalizers.Replace(" ", _SPIECE_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(_SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    pieces = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        pieces.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(pieces)
    return backend


def _rstrip_rule(metadata: Mapping[str, Any]) -> Callable[[str], bool]:
    """Whether a special token eats the whitespace after it: llama.cpp says so by model name
    (the file does not), for Phi-3 every special token but ``<unk>``, ``<s>`` and
    ``<|endoftext|>``."""
    name = _as_str(metadata.get("general.name") or "").lower()
    if "phi-3" not in name and "phi3" not in name:
        return lambda token: False
    return lambda token: token not in ("<unk>", "<s>", "<|endoftext|>")


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
    """``"left right"`` pairs, split where llama.cpp splits them: at the first space after
    the first character (so a left token may be a space)."""
    pairs = []
    for merge in merges:
        merge = _as_str(merge)
        cut = merge.find(" ", 1)
        if cut < 0 or cut == len(merge) - 1:
            raise InvalidInputError(f"malformed GGUF merge {merge!r}: expected two tokens")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def tokenizer_options(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Tokenizer`` arguments a GGUF file's metadata describes (all its key/value fields,
    decoded): the rebuilt ``tokenizers`` pipeline, the named special tokens and the flags.

    Raises:
        ValueError: no or an unsupported ``tokenizer.ggml.model`` (supported: "gpt2",
            "llama") or ``tokenizer.ggml.pre``; missing or inconsistent vocabulary arrays.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None:
        raise InvalidInputError("GGUF metadata has no tokenizer (no tokenizer.ggml.model)")
    kind = _as_str(kind)
    arch = _as_str(metadata.get("general.architecture", ""))
    if kind not in ("gpt2", "llama", "gemma4"):
        raise InvalidInputError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE), "
            "'llama' (sentencepiece) and 'gemma4' (BPE over spelled text)"
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
        backend = _byte_level_backend(tokens, types, _parse_merges(merges), pre)
        add_bos = flag("add_bos_token", _PRE_TOKENIZERS[pre].add_bos)
        alphabet = set(_byte_alphabet().values())
        # A "control" token spelled outside the byte alphabet is a converter mislabel (it
        # would get a new id past the model's vocabulary), so it stays an ordinary token.
        control_ok: Callable[[str], bool] = lambda tok: set(tok) <= alphabet  # noqa: E731
    elif kind == "gemma4":
        if merges is None:
            raise InvalidInputError("a gemma4 GGUF vocabulary needs tokenizer.ggml.merges")
        # Sentencepiece's BPE over spelled text (spaces as "▁", no prefix, <0xXX> bytes),
        # within runs of newlines and runs of anything else.
        backend = _sentencepiece_backend(tokens, _parse_merges(merges), add_space_prefix=False)
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
        add_bos = True  # llama.cpp adds Gemma 4's BOS whatever the file says
        control_ok = lambda tok: True  # noqa: E731
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
        )
        add_bos = flag("add_bos_token", True)
        control_ok = lambda tok: True  # noqa: E731

    rstrip = _rstrip_rule(metadata)
    looks_control = _CONTROL_LOOKING
    if not _NORMAL_S_MARKERS.isdisjoint(tokens):
        looks_control = looks_control - {"</s>"}
    control = [
        AddedToken(tok, normalized=False, special=True, rstrip=rstrip(tok))
        for tok, t in zip(tokens, types, strict=True)
        if (t == _CONTROL or tok in looks_control) and control_ok(tok)
    ]
    if control:
        backend.add_special_tokens(control)
    user = [
        AddedToken(tok, normalized=False, special=False, rstrip=rstrip(tok))
        for tok, t in zip(tokens, types, strict=True)
        if t == _USER_DEFINED
    ]
    if user:
        backend.add_tokens(user)
    # User-defined tokens spell text, which the byte-level decoder would read as bytes
    # (deepseek's "ü" is the byte 0xFC to it): they decode as their text, as in llama.cpp.
    verbatim = {
        i: tok
        for i, (tok, t) in enumerate(zip(tokens, types, strict=True))
        if kind == "gpt2" and t == _USER_DEFINED and backend.decode([i]) != tok
    }

    def token_id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) and 0 <= value < len(tokens) else None

    # The file names its special tokens by id: a vocabulary may spell two ids alike.
    ids = {
        "bos_token": token_id("bos_token_id"),
        "eos_token": token_id("eos_token_id"),
        "unk_token": token_id("unknown_token_id"),
        "pad_token": token_id("padding_token_id"),
    }
    named = {key: None if i is None else tokens[i] for key, i in ids.items()}
    # The model's named special tokens are special even when the file types them otherwise.
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in named.values() if t is not None and t not in added]
    if missing:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
    context = metadata.get(f"{arch}.context_length")
    template = metadata.get("tokenizer.chat_template")
    return dict(
        backend=backend,
        **named,
        special_ids={key: i for key, i in ids.items() if i is not None},
        verbatim=verbatim,
        add_bos=add_bos,
        add_eos=flag("add_eos_token", False),
        chat_template=None if template is None else _as_str(template),
        model_max_length=None if context is None else int(context),
        vocab_size=len(tokens),
    )


__all__ = ["tokenizer_options"]
