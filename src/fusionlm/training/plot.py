"""A loss-curve PNG without a plotting library: lines drawn into a numpy array, PNG by zlib.

Enough for a glance at a run: the training loss (blue), validation loss (orange dots), axes,
a legend, and the y range and step range written with a 3x5 pixel font.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_BLUE = (31, 119, 180)
_ORANGE = (255, 127, 14)
_GREY = (90, 90, 90)

# 3x5 glyphs, rows top to bottom, 3 bits each (4 = left pixel).
_FONT = {
    "0": (7, 5, 5, 5, 7),
    "1": (2, 6, 2, 2, 7),
    "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7),
    "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7),
    "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2),
    "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7),
    " ": (0, 0, 0, 0, 0),
    "A": (2, 5, 7, 5, 5),
    "E": (7, 4, 7, 4, 7),
    "I": (7, 2, 2, 2, 7),
    "L": (4, 4, 4, 4, 7),
    "N": (6, 5, 5, 5, 5),
    "O": (7, 5, 5, 5, 7),
    "P": (7, 5, 7, 4, 4),
    "R": (6, 5, 6, 5, 5),
    "S": (7, 4, 7, 1, 7),
    "T": (7, 2, 2, 2, 2),
    "V": (5, 5, 5, 5, 2),
}


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB ``uint8`` array ``[h, w, 3]``."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color: tuple) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, steps).round().astype(int)
    ys = np.linspace(y0, y1, steps).round().astype(int)
    h, w, _ = img.shape
    ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    img[ys[ok], xs[ok]] = color
    # Two pixels thick, so the curve stays visible when the image is scaled down.
    ok2 = ok & (ys + 1 < h)
    img[ys[ok2] + 1, xs[ok2]] = color


def _text(img: np.ndarray, x: int, y: int, text: str, *, scale: int = 2) -> None:
    for i, ch in enumerate(text):
        for r, bits in enumerate(_FONT.get(ch, _FONT[" "])):
            for c in range(3):
                if bits & (4 >> c):
                    x0, y0 = x + (i * 4 + c) * scale, y + r * scale
                    img[y0 : y0 + scale, x0 : x0 + scale] = _GREY


def _fmt(value: float) -> str:
    return f"{value:.3g}".replace("+", "")


def plot_losses(
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]] = (),
    *,
    width: int = 640,
    height: int = 400,
) -> np.ndarray:
    """The loss curve as an RGB array ``[height, width, 3]``; ``(step, loss)`` pairs."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    points = [*train, *val]
    if not points:
        return img
    steps = [s for s, _ in points]
    losses = [v for _, v in points if np.isfinite(v)] or [0.0]
    x_min, x_max = min(steps), max(max(steps), min(steps) + 1)
    y_min, y_max = min(losses), max(losses)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    pad = 0.05 * (y_max - y_min)
    # Losses are not negative; a padded axis should not suggest they could be.
    y_min, y_max = (y_min - pad if y_min < 0 else max(0.0, y_min - pad)), y_max + pad

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x_min) / (x_max - x_min) * (right - left)
        y = bottom - (loss - y_min) / (y_max - y_min) * (bottom - top)
        return x, y

    _line(img, left, top, left, bottom, _GREY)
    _line(img, left, bottom, right, bottom, _GREY)
    for i in range(1, 5):  # light horizontal grid
        y = top + i * (bottom - top) / 5
        img[int(y), left + 1 : right : 4] = (215, 215, 215)
    finite = [(s, v) for s, v in train if np.isfinite(v)]
    for (s0, v0), (s1, v1) in itertools.pairwise(finite):
        _line(img, *xy(s0, v0), *xy(s1, v1), _BLUE)
    if len(finite) == 1:
        x, y = xy(*finite[0])
        img[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = _BLUE
    for s, v in val:
        if np.isfinite(v):
            x, y = xy(s, v)
            img[max(0, int(y) - 3) : int(y) + 4, max(0, int(x) - 3) : int(x) + 4] = _ORANGE
    _text(img, 4, top, _fmt(y_max))
    _text(img, 4, bottom - 10, _fmt(y_min))
    _text(img, left, bottom + 8, _fmt(x_min))
    label = _fmt(x_max)
    _text(img, right - len(label) * 8, bottom + 8, label)
    _text(img, (left + right) // 2 - 16, bottom + 8, "STEP")
    _text(img, 4, (top + bottom) // 2, "LOSS")
    legend_x = right - 90
    _line(img, legend_x, top + 5, legend_x + 16, top + 5, _BLUE)
    _text(img, legend_x + 22, top, "TRAIN")
    if val:
        img[top + 17 : top + 24, legend_x + 5 : legend_x + 12] = _ORANGE
        _text(img, legend_x + 22, top + 16, "VAL")
    return img


def write_loss_png(
    path: str | os.PathLike[str],
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]] = (),
) -> Path:
    """Write the loss curve of ``(step, loss)`` pairs to ``path`` as a PNG."""
    path = Path(path)
    path.write_bytes(encode_png(plot_losses(train, val)))
    return path


__all__ = ["encode_png", "plot_losses", "write_loss_png"]
