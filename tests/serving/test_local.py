"""Finding a local server from its record: gone, not answering, or unreadable records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusionlm.cache import cache_root
from fusionlm.serving.local import ServedModel, find_server, model_identity, registered

MODEL = "smollm2-135m-instruct"


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(tmp_path))
    return tmp_path / "servers"


def record(pid: int) -> ServedModel:
    return ServedModel(
        url="http://127.0.0.1:9",  # the discard port: nothing answers there
        pid=pid,
        name=MODEL,
        weights=model_identity(MODEL),
        dtype="float32",
        quant="auto",
        threads=2,
        chat=True,
        precision="int4",
    )


def test_a_record_of_a_server_that_is_gone_is_removed(records):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    with registered(record(int(finished.stdout))):
        (path,) = records.glob("*.json")
        assert find_server(MODEL, dtype="float32", quant="auto", threads=None) is None
        assert not path.exists()


def test_a_server_that_does_not_answer_is_not_used_and_its_record_stays_until_it_stops(records):
    with registered(record(os.getpid())):
        (records / "junk.json").write_text("{not json")
        assert find_server(MODEL, dtype="float32", quant="auto", threads=None) is None
        assert json.loads((records / f"{os.getpid()}.json").read_text())["pid"] == os.getpid()
    assert [p.name for p in records.iterdir()] == ["junk.json"]
    assert cache_root() / "servers" == records


def test_the_weights_identity_changes_with_the_file(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"one")
    before = model_identity(str(weights))
    weights.write_bytes(b"other")
    assert model_identity(str(weights)) != before
