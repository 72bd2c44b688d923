"""Hostile input: mutated and truncated copies of valid GGUF and safetensors files, and chat
templates that try to leave their sandbox. Every case ends in the documented error (a
``ValueError`` naming what is wrong), never another exception, a hang, or an allocation the
file's size does not back. ``benchmarks/fuzz.py`` runs the same for as long as asked."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionlm.tokenizer import Tokenizer
from tests.helpers import (
    EXTREMES,
    READER_ERRORS,
    gguf_header_size,
    gguf_readers,
    mutated,
    safetensors_readers,
    small_gguf,
    small_safetensors_dir,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure repeats
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Original(bytes):
    """A valid file's bytes, shown by size only in a failing case's report."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> Original:
    return Original(small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes())


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory) -> tuple[Original, Original]:
    directory = small_safetensors_dir(tmp_path_factory.mktemp("st") / "model")
    config, weights = directory / "config.json", directory / "model.safetensors"
    return Original(config.read_bytes()), Original(weights.read_bytes())


def edits_within(size: int) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """Byte runs written over the first ``size`` bytes: random bytes, or a count, length,
    offset or dimension at its extremes (as a little-endian u64 or u32)."""
    extreme = st.sampled_from(EXTREMES).flatmap(
        lambda v: st.sampled_from([struct.pack("<Q", v), struct.pack("<I", v & 0xFFFFFFFF)])
    )
    patch = st.one_of(st.binary(min_size=1, max_size=8), extreme)
    return st.lists(st.tuples(st.integers(0, size - 1), patch), min_size=1, max_size=4)


def check(read, path: Path) -> None:
    try:
        read(path)
    except READER_ERRORS as e:
        assert str(e), f"{type(e).__name__} without a message"


@FUZZ
@given(data=st.data())
def test_mutated_gguf_headers_are_refused_with_the_documented_error(
    gguf_bytes, tmp_path, data, monkeypatch
):
    """The 64-token vocabulary counts as a long array here: it is skipped when the header is
    parsed, read when the tokenizer asks."""
    monkeypatch.setattr("fusionlm.checkpoint.gguf.LONG_ARRAY_ITEMS", 16)
    header = gguf_header_size(gguf_bytes)
    edits = data.draw(edits_within(header))
    keep = data.draw(st.none() | st.integers(0, len(gguf_bytes)))
    path = tmp_path / "hostile.gguf"
    path.write_bytes(mutated(gguf_bytes, edits, keep=keep))
    for read in gguf_readers():
        check(read, path)


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_are_refused_with_the_documented_error(
    safetensors_bytes, tmp_path, data
):
    config, weights = safetensors_bytes
    (header_size,) = struct.unpack("<Q", weights[:8])
    directory = tmp_path / "hostile"
    directory.mkdir(exist_ok=True)
    which = data.draw(st.sampled_from(["config", "weights"]))
    original = config if which == "config" else weights
    size = len(config) if which == "config" else 8 + header_size
    edits = data.draw(edits_within(size))
    keep = data.draw(st.none() | st.integers(0, len(original)))
    hostile = mutated(original, edits, keep=keep)
    (directory / "config.json").write_bytes(hostile if which == "config" else config)
    (directory / "model.safetensors").write_bytes(hostile if which == "weights" else weights)
    for read in safetensors_readers():
        check(read, directory)


def test_a_tensor_claiming_2_to_the_40_elements_is_refused_before_allocating(gguf_bytes, tmp_path):
    """The first tensor's first dimension, set to 2^40: refused from the header (a file of
    20 KB cannot back it), not by a failed allocation."""
    from fusionlm.checkpoint.gguf import read_gguf

    header = gguf_header_size(gguf_bytes)
    name = b"token_embd.weight"
    at = gguf_bytes.index(name, 0, header) + len(name) + 4  # after the name and n_dims
    path = tmp_path / "huge.gguf"
    path.write_bytes(mutated(gguf_bytes, [(at, struct.pack("<Q", 2**40))], keep=None))
    with pytest.raises(ValueError, match=r"runs past|ends at byte|does not fit"):
        read_gguf(path, dtype=torch.float32)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% for m in messages %}{{ m.__class__.__base__ }}{% endfor %}",
        "{{ open('/etc/passwd').read() }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_chat_templates_cannot_leave_the_sandbox(template):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    tokenizer = Tokenizer(
        Backend(models.WordLevel({"a": 0}, unk_token="a")), chat_template=template
    )
    with pytest.raises(ValueError, match="chat template error"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
