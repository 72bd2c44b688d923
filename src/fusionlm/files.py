"""Files written whole or not at all, and JSON objects read with errors that name the file."""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusionlm.errors import InvalidInputError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(temporary)``, a file beside it that is renamed into
    place once ``write`` returns: an interrupted write never leaves a half-written file under
    ``path``, and leaves no temporary file either. The file gets the mode a plain ``open``
    would give it (``0o666`` less the umask)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # Created here, not by tempfile (whose files are 0600 whatever the umask); a writer that
    # replaces the file (safetensors does) gets the mode back before the rename.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = stat.S_IMODE(temporary.stat().st_mode)
    try:
        write(temporary)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` of UTF-8 ``text``."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not UTF-8 JSON, or JSON that is not an object; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = ["atomic_write", "atomic_write_text", "read_json_object"]
