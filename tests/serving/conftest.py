"""``fusionlm serve`` in a subprocess on 127.0.0.1 and a free port, stopped by the tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fusionlm.cache import cache_root
from tests.helpers import ServerProcess


@pytest.fixture(scope="package")
def server() -> Iterator[ServerProcess]:
    """The default model as served: its decode step compiled for 4 rows of 512 tokens
    (built once per test session, ~45 s on two cores; every request after runs it)."""
    process = ServerProcess("--slots", "4", "--ctx", "512", "--threads", "2")
    yield process
    assert process.stop() == 0
    assert not list((cache_root() / "servers").glob("*.json"))  # its record went with it
