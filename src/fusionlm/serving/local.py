"""The servers on this machine that ``fusionlm generate`` and ``chat`` can use, and their client.

A ``fusionlm serve`` bound to a loopback address without API keys records what it serves in
``cache_root()/servers/<pid>.json`` while it runs. A command given the same model, weights
version, dtype, quantization and thread count sends its request there instead of loading the
model: the reply is the one the command would compute itself (the server decodes each row
as a lone run does), without paying for ``import torch`` and the load in every process.

Nothing here imports torch or the server's stack: it runs in the command's first 0.1 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusionlm.cache import cache_root
from fusionlm.files import atomic_write_text
from fusionlm.models.registry import resolve

HEALTH_TIMEOUT_S = 0.5
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One running server and what it computes with.

    ``weights`` names the weights and their version (``model_identity``); ``threads`` is the
    server's thread count, which a prompt's fp32 prefill depends on in its last bits;
    ``chat`` whether the model has a chat template; ``precision`` what its layers run in.
    """

    url: str
    pid: int
    name: str
    weights: str
    dtype: str
    quant: str
    threads: int
    chat: bool
    precision: str


class ServerError(Exception):
    """The server answered with an error status; ``code`` is OpenAI's error code, if any."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def model_identity(model: str) -> str:
    """``model``'s resolved path and the version of its weights (size and modification time
    of the file, or of each file of a directory): equal only for the same weights."""
    path = resolve(model).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = []
    for file in files:
        stat = file.stat()
        stats.append((file.name, stat.st_size, stat.st_mtime_ns))
    return json.dumps([str(path), stats])


@contextlib.contextmanager
def registered(served: ServedModel) -> Iterator[None]:
    """Record ``served`` for this machine's commands while the block runs."""
    record = _records_dir() / f"{served.pid}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(dataclasses.asdict(served)))
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


def find_server(model: str, *, dtype: str, quant: str, threads: int | None) -> ServedModel | None:
    """A running, ready server that computes ``model`` exactly as this process would with
    these settings (``threads`` None: any count), or None. Records of servers that are gone
    are removed."""
    try:
        records = sorted(_records_dir().glob("*.json"))
        weights = model_identity(model) if records else None  # no server: no work
    except OSError:
        return None
    for record in records:
        try:
            served = ServedModel(**json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not _alive(served.pid):
            record.unlink(missing_ok=True)
            continue
        same = (served.weights, served.dtype, served.quant) == (weights, dtype, quant)
        if same and threads in (None, served.threads) and _ready(served.url):
            return served
    return None


def stream(served: ServedModel, route: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """POST ``body`` (with ``"stream": true``) to ``route`` and yield each server-sent event's
    JSON object until ``[DONE]``.

    Raises:
        ServerError: the server answered with an error status, or sent an error event.
        OSError: the server could not be reached.
    """
    connection = _connection(served.url, timeout=None)
    try:
        connection.request(
            "POST", route, json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            raise _error(response.status, response.read())
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[len(b"data: ") :].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if "error" in event:  # the server stopped the reply (it is shutting down)
                raise _error(503, data)
            yield event
    finally:
        connection.close()


def _records_dir() -> Path:
    return cache_root() / "servers"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ready(url: str) -> bool:
    connection = _connection(url, timeout=HEALTH_TIMEOUT_S)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _connection(url: str, *, timeout: float | None) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _error(status: int, raw: bytes) -> ServerError:
    try:
        error = json.loads(raw)["error"]
        return ServerError(status, error["message"], error.get("code"))
    except (ValueError, KeyError, TypeError):
        return ServerError(status, raw.decode(errors="replace")[:200] or f"status {status}", None)


__all__ = [
    "LOOPBACK_HOSTS",
    "ServedModel",
    "ServerError",
    "find_server",
    "model_identity",
    "registered",
    "stream",
]
