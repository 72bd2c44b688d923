"""The ASGI app: OpenAI's routes, server-sent events, API keys, metrics.

The event loop never runs model code: a request is validated, tokenized and handed to the
``Engine``; its tokens come back through an ``asyncio.Queue`` and are turned into text here
(``TextStream``: whole characters only, stop strings held back and never sent).

Every client mistake is a 4xx with OpenAI's error object: 400 for invalid fields,
malformed JSON, chat-template errors and prompts longer than a row; 401 for a missing or
wrong key; 404 for an unknown model or route; 413 for a body over the limit; 429 (with
``Retry-After``) when the queue is full; 503 while loading or draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fusionlm.generation import TextStream
from fusionlm.serving import engine as engine_module
from fusionlm.serving.engine import Engine, Failed, Finished, NotAccepting, QueueFull, Started
from fusionlm.serving.metrics import ServerMetrics
from fusionlm.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    error_body,
    new_id,
    now,
    usage,
)
from fusionlm.tokenizer import Tokenizer

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks that its client is still there."""
RETRY_AFTER_S = 1


@dataclass
class ServerState:
    """What the routes share."""

    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    metrics: ServerMetrics
    api_keys: Sequence[str] = ()
    draining: bool = False

    def piece(self, token: int) -> str:
        """The text of one token (for log-probabilities)."""
        return _token_text(self.tokenizer, token)


@functools.lru_cache(maxsize=65536)
def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def create_app(state: ServerState, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The server's routes on ``state``."""
    app = FastAPI(title="fusionlm", summary="An OpenAI-compatible server for fusionlm models")
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        else:
            param = ".".join(location) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(error_body(message, type="invalid_request_error", param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "no such route" if error.status_code == 404 else str(error.detail)
        return JSONResponse(
            error_body(message, type="invalid_request_error", code=str(error.status_code)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        # A bug of ours, never a client's mistake: say so, without a traceback.
        message = f"internal error: {type(error).__name__}: {error}"
        return JSONResponse(error_body(message, type="server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(
                401, "missing API key: send Authorization: Bearer <key>", code="invalid_api_key"
            )
        # Every key is compared, in constant time, whichever matches.
        matches = [hmac.compare_digest(given.encode(), key.encode()) for key in state.api_keys]
        if not any(matches):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    def ready() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", type="server_error")
        if not state.engine.ready.is_set():
            raise APIError(503, "the model is loading", type="server_error", code="loading")

    guarded = [Depends(authorize), Depends(ready)]

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model and its decode step are ready; 503 while loading or draining."""
        ready()
        return JSONResponse({"status": "ok", "compiled": state.engine.compiled})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model}", dependencies=[Depends(authorize)])
    async def model(model: str) -> dict[str, Any]:
        check_model(state, model)
        return model_card(state)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        body.check_supported()
        check_model(state, body.model)
        prompt = encode_chat(state.tokenizer, body.messages)
        return await respond(state, body, [prompt], request, chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check_supported()
        check_model(state, body.model)
        prompts = prompt_ids(state.tokenizer, body.prompt)
        return await respond(state, body, prompts, request, chat=False)

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.messages is not None:
            ids = encode_chat(
                state.tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt
            )
        else:
            text = body.prompt if body.prompt is not None else body.content
            if text is None:
                raise APIError(400, "give prompt (or content), or messages", param="prompt")
            ids = state.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.ctx}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        vocab = state.tokenizer.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError(400, f"token ids must be below {vocab}", param="tokens")
        text = state.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    return app


def model_card(state: ServerState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "fusionlm",
        "max_model_len": state.engine.ctx,
    }


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server runs {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def encode_chat(
    tokenizer: Tokenizer, messages: list[ChatMessage], *, add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of ``messages`` in the model's chat template (OpenAI's ``developer``
    role is the template's ``system``)."""
    if not tokenizer.is_chat:
        raise APIError(400, "this model has no chat template; use /v1/completions")
    turns = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in messages
    ]
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt)
    except ValueError as error:
        raise APIError(400, str(error), param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer: Tokenizer, prompt: str | list) -> list[list[int]]:
    """The token ids of each prompt of a completions request."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    vocab = tokenizer.vocab_size
    for i, p in enumerate(ids):
        if not p:
            raise APIError(400, f"prompt {i} has no tokens", param="prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise APIError(400, f"prompt {i}: token ids must be in [0, {vocab})", param="prompt")
    return ids


# -- generation ------------------------------------------------------------------------------


@dataclass
class ChoiceState:
    """One choice's text as it is built, with the log-probabilities not yet sent."""

    text: TextStream
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)


@dataclass(frozen=True)
class Update:
    """New text of choice ``index`` (its log-probabilities) and, at its end, why it ended."""

    index: int
    text: str
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]]
    finish_reason: str | None = None


class Run:
    """One API request on the engine: a ticket per prompt, their events merged in order."""

    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest | CompletionRequest,
        prompts: list[list[int]],
    ) -> None:
        self.state = state
        self.n = body.n
        self.events: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.cached_tokens = 0
        self.choices = [
            ChoiceState(TextStream(state.tokenizer, stop_strings=body.stop))
            for _ in range(len(prompts) * body.n)
        ]
        engine = state.engine
        if body.n > engine.slots:
            raise APIError(400, f"n must be at most {engine.slots}, the server's slots", param="n")
        requests = [self._request(body, prompt) for prompt in prompts]
        loop = asyncio.get_running_loop()
        self.tickets = []
        try:
            for p, request in enumerate(requests):
                sink = functools.partial(_post, loop, self.events, p)
                self.tickets.append(engine.submit(request, sink))
        except QueueFull as error:
            self.cancel()
            state.metrics.rejected.inc()
            raise APIError(
                429,
                f"{error}; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except NotAccepting as error:
            self.cancel()
            state.metrics.rejected.inc()
            raise APIError(503, str(error), type="server_error") from None

    def _request(
        self, body: ChatCompletionRequest | CompletionRequest, prompt: list[int]
    ) -> engine_module.Request:
        ctx = self.state.engine.ctx
        room = ctx - len(prompt)
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens, but a request's context is {ctx} tokens "
                "(prompt and reply); shorten the prompt",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        try:
            sampling = body.sampling()
        except ValueError as error:
            raise APIError(400, str(error)) from None
        vocab = self.state.tokenizer.vocab_size
        if sampling.logit_bias and max(sampling.logit_bias) >= vocab:
            raise APIError(400, f"logit_bias token ids must be below {vocab}", param="logit_bias")
        return engine_module.Request(
            prompt=prompt,
            max_tokens=min(body.token_limit() or room, room),
            sampling=sampling,
            n=body.n,
            seed=body.seed,
            stop_ids=frozenset() if body.ignore_eos else frozenset(self.state.tokenizer.stop_ids),
            logprobs=body.logprobs_count(),
            cache_prompt=body.cache_prompt,
        )

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def cancel(self) -> None:
        """Stop whatever of this request still runs (the client left, or it failed)."""
        for ticket in self.tickets:
            self.state.engine.cancel(ticket)

    async def updates(self, request: Request | None = None) -> AsyncIterator[Update]:
        """Each choice's text as it grows, until every choice has ended. With ``request``
        (not streaming), the client is checked now and then; if it left, the request is
        cancelled and this ends."""
        while not self.done:
            if request is None:
                prompt, event = await self.events.get()
            else:
                try:
                    prompt, event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:  # Python 3.10's is not the builtin one
                    if await request.is_disconnected():
                        self.cancel()
                        return
                    continue
            update = self._apply(prompt, event)
            if update is not None:
                yield update

    def _apply(self, prompt: int, event: object) -> Update | None:
        if isinstance(event, Failed):
            raise APIError(503, event.message, type="server_error")
        if isinstance(event, Started):
            self.cached_tokens += event.cached_tokens
            return None
        index = prompt * self.n + event.choice
        choice = self.choices[index]
        if choice.finish_reason is not None:
            return None  # a choice cut by a stop string, still running until its cancel lands
        if isinstance(event, Finished):
            choice.tokens = event.completion_tokens
            choice.finish_reason = event.reason
            return self._update(index, choice.text.finish())
        choice.tokens += 1
        if event.logprob is not None:
            choice.logprobs.append((event.id, event.logprob, event.top_logprobs))
        text = choice.text.push(event.id)
        if choice.text.stopped:
            choice.finish_reason = "stop"
            self.state.engine.cancel(self.tickets[prompt], choice=event.choice)
        if not text and choice.finish_reason is None:
            return None
        return self._update(index, text)

    def _update(self, index: int, text: str) -> Update:
        choice = self.choices[index]
        logprobs, choice.logprobs = choice.logprobs, []
        return Update(index, text, logprobs, choice.finish_reason)

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, sum(c.tokens for c in self.choices), self.cached_tokens)


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, prompt: int, event) -> None:
    """The engine's sink: hand ``event`` to the event loop (dropped once the loop is gone)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(events.put_nowait, (prompt, event))


async def respond(
    state: ServerState,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    request: Request,
    *,
    chat: bool,
) -> Response:
    run = Run(state, body, prompts)
    shape = ResponseShape(state, chat=chat)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            stream(run, shape, include_usage=include_usage, logprobs=body.logprobs_count()),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    texts = [""] * len(run.choices)
    logprobs: list[list] = [[] for _ in run.choices]
    try:
        async for update in run.updates(request):
            texts[update.index] += update.text
            logprobs[update.index].extend(update.logprobs)
    finally:
        if not run.done:
            run.cancel()
    if not run.done:  # the client left
        return Response(status_code=499)
    choices = [
        shape.choice(i, texts[i], logprobs[i], c.finish_reason, logprobs=body.logprobs_count())
        for i, c in enumerate(run.choices)
    ]
    return JSONResponse(shape.body(choices, chunk=False, usage=run.usage()))


async def stream(
    run: Run, shape: ResponseShape, *, include_usage: bool, logprobs: int | None
) -> AsyncIterator[str]:
    """Server-sent events: (chat: a role chunk per choice), text chunks (with ``logprobs``
    alternatives per token, if not None), a chunk with each choice's ``finish_reason``, the
    usage chunk if asked, ``[DONE]``. An error after the headers is an ``error`` event, then
    the stream ends."""
    extra = {"usage": None} if include_usage else {}
    try:
        if shape.chat:
            for i in range(len(run.choices)):
                yield sse(shape.body([shape.delta(i, role=True)], **extra))
        async for update in run.updates():
            if update.text or update.logprobs:
                delta = shape.delta(update.index, text=update.text)
                if logprobs is not None:
                    delta["logprobs"] = shape.logprobs(update.logprobs, logprobs)
                yield sse(shape.body([delta], **extra))
            if update.finish_reason is not None:
                final = shape.delta(update.index, finish_reason=update.finish_reason)
                yield sse(shape.body([final], **extra))
        if include_usage:
            yield sse(shape.body([], usage=run.usage()))
        yield "data: [DONE]\n\n"
    except APIError as error:
        yield sse(error.body())
    finally:
        if not run.done:
            run.cancel()


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ResponseShape:
    """OpenAI's response bodies for chat (``chat.completion``) or completions
    (``text_completion``), and their streamed chunks."""

    def __init__(self, state: ServerState, *, chat: bool) -> None:
        self.state = state
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()

    def body(
        self, choices: list[dict[str, Any]], *, chunk: bool = True, **extra: Any
    ) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.state.model_name,
            "system_fingerprint": "fusionlm",
            "choices": choices,
            **extra,
        }

    def choice(
        self,
        index: int,
        text: str,
        entries: list,
        finish_reason: str | None,
        *,
        logprobs: int | None,
    ) -> dict[str, Any]:
        content = self.logprobs(entries, logprobs) if logprobs is not None else None
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "logprobs": content,
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "logprobs": content, "finish_reason": finish_reason}

    def delta(
        self,
        index: int,
        *,
        text: str = "",
        role: bool = False,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def logprobs(self, entries: list, top: int) -> dict[str, Any]:
        """Chat: ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions:
        ``{tokens, token_logprobs, top_logprobs, text_offset}``."""
        piece = self.state.piece
        if self.chat:
            return {
                "content": [
                    {
                        **_token_entry(piece(token), logprob),
                        "top_logprobs": [_token_entry(piece(t), lp) for t, lp in alternatives],
                    }
                    for token, logprob, alternatives in entries
                ]
            }
        tokens = [piece(token) for token, _, _ in entries]
        offsets, offset = [], 0
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [
                {piece(t): lp for t, lp in alternatives} if top else None
                for _, _, alternatives in entries
            ],
            "text_offset": offsets,
        }


def _token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


class BodyLimit:
    """413 for a request body over ``limit`` bytes, declared or sent. The body is read
    here, whole, and handed on: a JSON request is read whole anyway."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                response = JSONResponse(
                    error_body(
                        f"the request body is over {self.limit} bytes",
                        type="invalid_request_error",
                        code="request_too_large",
                    ),
                    status_code=413,
                )
                await response(scope, receive, send)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "create_app"]
