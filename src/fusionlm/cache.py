"""Where fusionlm keeps what it builds for this machine (CPU kernels, compiled decode steps)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """``$FUSIONLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusionlm`` (``~/.cache/fusionlm``)."""
    if os.environ.get("FUSIONLM_CACHE_DIR"):
        return Path(os.environ["FUSIONLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fusionlm")


@functools.cache
def cpu_fingerprint() -> str:
    """A short hash of the CPU model and its instruction-set flags: code built with
    ``-march=native`` runs only where this is the same."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = sorted({line for line in lines if line.startswith(("model name", "flags"))})
    except OSError:
        wanted = [platform.processor() or platform.machine()]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]


__all__ = ["cache_root", "cpu_fingerprint"]
