"""The server process: the engine, the app under uvicorn, and the drain on SIGTERM.

SIGTERM (or Ctrl-C) drains: new requests get 503, running ones may finish within
``drain_timeout`` seconds, the rest are then cancelled (a streaming client gets an error
event), and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
import uvicorn

from fusionlm.generation import PREFILL_CHUNK
from fusionlm.inference.decode_step import CompileMode
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.serving.app import ServerState, create_app
from fusionlm.serving.engine import Engine
from fusionlm.serving.metrics import ServerMetrics
from fusionlm.tokenizer import Tokenizer


def serve(
    load: Callable[[], TransformerDecoder],
    tokenizer: Tokenizer,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    slots: int = 4,
    ctx: int = 2048,
    max_queue: int = 64,
    api_keys: Sequence[str] = (),
    drain_timeout: float = 30.0,
    compile: CompileMode = True,
    build_step: Callable[[int, int], None] | None = None,
    cache_dtype: torch.dtype | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> None:
    """Serve until SIGTERM or Ctrl-C. ``load`` makes the model on the engine thread (the
    server answers ``/health`` with 503 meanwhile); ``build_step`` builds a missing decode
    step in another process, ``cache_dtype`` is the KV cache's (see ``Engine``).

    Raises:
        whatever ``load`` or setting up the decode step raised: the server cannot serve.
    """
    metrics = ServerMetrics(slots=slots)
    engine = Engine(
        load,
        slots=slots,
        ctx=ctx,
        max_queue=max_queue,
        compile=compile,
        build_step=build_step,
        cache_dtype=cache_dtype,
        prefill_chunk=prefill_chunk,
        metrics=metrics,
    )
    state = ServerState(engine, tokenizer, model_name, metrics, api_keys=tuple(api_keys))
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    # uvicorn imports its protocol modules here: before the engine thread starts, whose first
    # decode-step build imports and runs the compiler. An import racing it failed once
    # ("No module named 'uvicorn.protocols.http.h11_impl'", a file that was there).
    config.load()
    server = _UvicornServer(config)
    failures: list[BaseException] = []

    def fatal(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    engine.start(on_fatal=fatal)
    try:
        asyncio.run(_serve(server, state, drain_timeout=drain_timeout))
    finally:
        engine.stop()
    if failures:
        raise failures[0]


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, leaving SIGTERM and SIGINT to ``_serve`` (uvicorn's own handling
    would stop without draining and re-raise the signal, so the process would not exit 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(server: uvicorn.Server, state: ServerState, *, drain_timeout: float) -> None:
    loop = asyncio.get_running_loop()
    drain: asyncio.Task | None = None

    def on_signal() -> None:
        nonlocal drain
        if drain is None:
            print("fusionlm: draining: running requests may finish", file=sys.stderr, flush=True)
            drain = loop.create_task(_drain(server, state, timeout=drain_timeout))
        else:
            server.force_exit = server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await server.serve()


async def _drain(server: uvicorn.Server, state: ServerState, *, timeout: float) -> None:
    """Refuse new requests, wait up to ``timeout`` s for running ones, cancel the rest, stop."""
    state.draining = True
    state.engine.stop_accepting()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while state.engine.busy and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if state.engine.busy:
        state.engine.cancel_all()
        await asyncio.sleep(0.2)  # time for the cancelled streams to send their error event
    server.should_exit = True


__all__ = ["serve"]
