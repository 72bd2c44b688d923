"""Hostile files for as long as asked: the cases of tests/checkpoint/test_hostile_files.py, drawn
at random instead of by hypothesis, until the time runs out.

    .venv/bin/python benchmarks/fuzz.py --seconds 600 [--seed 1]

Mutated and truncated copies of a small valid GGUF file and of a transformers directory
(config.json, model.safetensors) go to every reader. Each case must end in the readers'
documented error (a ``ValueError`` with a message, or a missing file) or read cleanly;
anything else is a failure: its bytes are written to ``--failures`` and the run exits 1.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.helpers

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


def random_edits(rng: random.Random, size: int) -> list[tuple[int, bytes]]:
    """1-4 runs of random bytes, or of an extreme count as u64 or u32, within ``size``."""
    edits = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            patch = rng.randbytes(rng.randint(1, 8))
        else:
            value = rng.choice(EXTREMES)
            patch = (
                struct.pack("<Q", value)
                if rng.random() < 0.5
                else struct.pack("<I", value & 0xFFFFFFFF)
            )
        edits.append((rng.randrange(size), patch))
    return edits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failures", default="fuzz-failures", help="where failing cases go")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fusionlm-fuzz-"))
    gguf = small_gguf(work / "small.gguf").read_bytes()
    gguf_header = gguf_header_size(gguf)
    original_dir = small_safetensors_dir(work / "original")
    config = (original_dir / "config.json").read_bytes()
    weights = (original_dir / "model.safetensors").read_bytes()
    (weights_header,) = struct.unpack("<Q", weights[:8])
    counts = {"cases": 0, "refused": 0, "read": 0, "failures": 0}
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        kind = rng.choice(["gguf", "config", "weights"])
        if kind == "gguf":
            original, size = gguf, gguf_header
        elif kind == "config":
            original, size = config, len(config)
        else:
            original, size = weights, 8 + weights_header
        keep = rng.randint(0, len(original)) if rng.random() < 0.3 else None
        hostile = mutated(original, random_edits(rng, size), keep=keep)
        if kind == "gguf":
            target = work / "case.gguf"
            target.write_bytes(hostile)
            readers = gguf_readers()
        else:
            target = work / "case"
            target.mkdir(exist_ok=True)
            (target / "config.json").write_bytes(hostile if kind == "config" else config)
            (target / "model.safetensors").write_bytes(hostile if kind == "weights" else weights)
            readers = safetensors_readers()
        counts["cases"] += 1
        for read in readers:
            try:
                read(target)
                counts["read"] += 1
            except READER_ERRORS as e:
                counts["refused"] += 1
                if not str(e):
                    raise AssertionError(f"{type(e).__name__} without a message") from e
            except Exception:  # anything else is a bug: keep the case
                counts["failures"] += 1
                out = Path(args.failures)
                out.mkdir(exist_ok=True)
                (out / f"case-{counts['cases']}-{kind}.bin").write_bytes(hostile)
                print(
                    f"case {counts['cases']} ({kind}):\n{traceback.format_exc()}", file=sys.stderr
                )
    rate = counts["cases"] / args.seconds
    print(
        f"{counts['cases']} cases in {args.seconds:.0f} s ({rate:.0f}/s): {counts['refused']} "
        f"reads refused with the documented error, {counts['read']} read cleanly, "
        f"{counts['failures']} failures"
    )
    return 1 if counts["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
