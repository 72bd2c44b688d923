"""Chat templates: jinja2 source from a model's tokenizer files, run in an immutable sandbox
that refuses unsafe attribute access, with the helpers transformers gives templates
(``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, the ``generation`` tag).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fusionlm.errors import InvalidInputError


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


def render_chat_template(
    source: str,
    messages: Any,
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    """``messages`` (``[{"role": ..., "content": ...}, ...]``) rendered by the template
    ``source``, which also sees ``add_generation_prompt`` and the ``special_tokens`` texts
    (``bos_token``, ``eos_token``, ...).

    Raises:
        ValueError: malformed ``messages``; a template that does not compile or fails (its
            message, e.g. from ``raise_exception``, is in the error).
    """
    checked = _check_messages(messages)
    template = _compile_template(source)
    try:
        return template.render(
            messages=checked,
            add_generation_prompt=bool(add_generation_prompt),
            tools=None,
            documents=None,
            **special_tokens,
        )
    except jinja2.TemplateError as e:
        raise InvalidInputError(f"chat template error: {e}") from e
    except (TypeError, ArithmeticError, LookupError, AttributeError, ValueError) as e:
        # Python errors raised by template code (e.g. "str" + None) are template errors too.
        raise InvalidInputError(f"chat template error: {type(e).__name__}: {e}") from e


__all__ = ["render_chat_template"]
