"""``fusionlm serve`` in a subprocess on 127.0.0.1 and a free port, stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from fusionlm.cache import cache_root

MODEL = "smollm2-135m-instruct"


class ServerProcess:
    """A running server: its base URL, an ``openai`` client, its process."""

    def __init__(self, *options: str, api_key: str = "none") -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "fusionlm", "serve", "--port", str(self.port), *options]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
        )
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)
        self.wait_ready()

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stdout.read()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("the server did not become ready")

    def metric(self, name: str) -> float:
        """A sample's value from ``/metrics``."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a drain), then a kill if it has not exited within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        return self.process.returncode


@pytest.fixture(scope="package")
def server() -> Iterator[ServerProcess]:
    """The default model as served: its decode step compiled for 4 rows of 512 tokens
    (built once per test session, ~45 s on two cores; every request after runs it)."""
    process = ServerProcess("--slots", "4", "--ctx", "512", "--threads", "2")
    yield process
    assert process.stop() == 0
    assert not list((cache_root() / "servers").glob("*.json"))  # its record went with it
