"""The tokenizer: text <-> token ids for one vocabulary over the ``tokenizers`` library, built
from a GGUF file's metadata (``fusionlm.tokenizer.gguf``) or a transformers directory, with
the model's special tokens, chat template (``fusionlm.tokenizer.chat``) and streaming decode
(``fusionlm.tokenizer.stream``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from fusionlm.errors import InvalidInputError
from fusionlm.files import atomic_write_text, read_json_object
from fusionlm.tokenizer.chat import render_chat_template
from fusionlm.tokenizer.gguf import tokenizer_options
from fusionlm.tokenizer.stream import StreamDecoder, byte_fallback_ids, decode_ids

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
        special_ids: Mapping[str, int] | None = None,
        verbatim: Mapping[int, str] | None = None,
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
            verbatim: ids decoded as their text rather than through ``backend``'s decoder
                (user-defined tokens of a byte-level vocabulary that spell characters).
            special_ids: the ids of ``bos_token`` and the others where known (a GGUF file
                names them by id, and a vocabulary may spell two ids alike); else each is its
                text's id.
        """
        self._backend = backend
        self._special_ids = dict(special_ids or {})
        self._verbatim = dict(verbatim or {})
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
        if text is None:
            return None
        return self._special_ids.get(key, self._backend.token_to_id(text))

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
        """The tokenizer a GGUF file's metadata describes (all its key/value fields, decoded;
        see ``fusionlm.tokenizer.gguf``).

        Raises:
            ValueError: no or an unsupported ``tokenizer.ggml.model`` (supported: "gpt2",
                "llama") or ``tokenizer.ggml.pre``; missing or inconsistent vocabulary arrays.
        """
        return cls(**tokenizer_options(metadata))

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
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        generation = _read_json(directory / "generation_config.json")

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
        return decode_ids(
            self._backend,
            [int(i) for i in ids],
            skip_special_tokens=skip_special_tokens,
            verbatim=self._verbatim,
        )

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder fed one id at a time whose outputs concatenate to ``decode(ids)``."""
        if self._byte_ids is None:
            self._byte_ids = byte_fallback_ids(self._backend)
        return StreamDecoder(
            self._backend,
            skip_special_tokens=skip_special_tokens,
            byte_ids=self._byte_ids,
            verbatim=self._verbatim,
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
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens={k: v for k, v in self._tokens.items() if v is not None},
        )

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


__all__ = ["Tokenizer"]
