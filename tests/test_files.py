"""Atomic writes (whole or not at all, with a plain file's mode) and JSON objects read."""

from __future__ import annotations

import os
import stat

import pytest

from fusionlm.files import atomic_write, atomic_write_text, read_json_object


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_written_file_has_the_mode_of_a_plain_write(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "plain").write_text("{}")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")

    def fails(temporary):
        temporary.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fails)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("[1, 2]", "must hold a JSON object, got list"), ("{oops", "is not valid JSON")],
)
def test_bad_json_is_a_value_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        read_json_object(path)
    assert str(path) in str(raised.value)
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_json_object(tmp_path / "missing.json")
