"""The loss curve of a fine-tuning run as a PNG, drawn with matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

PLOT_EXTRA = "pip install 'fusionlm[plot]'"


def write_loss_png(
    path: str | os.PathLike[str],
    train: Sequence[tuple[int, float]],
    val: Sequence[tuple[int, float]] = (),
) -> Path:
    """Plot the training loss (a line) and the validation loss (dots) of ``(step, loss)``
    pairs against the step, and write the figure to ``path`` as a 1280x800 PNG.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        from matplotlib import pyplot as plt
    except ImportError as e:
        raise ImportError(f"a loss curve needs matplotlib: {PLOT_EXTRA} ({e})") from None
    path = Path(path)
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=200, layout="constrained")
    try:
        for points, style in ((train, {"label": "train"}), (val, {"label": "validation"})):
            finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
            if finite:
                steps, losses = zip(*finite, strict=True)
                marker = "o" if points is val or len(finite) == 1 else None
                axes.plot(
                    steps, losses, marker=marker, linestyle="-" if points is train else "", **style
                )
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        if train or val:
            axes.legend()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


__all__ = ["PLOT_EXTRA", "write_loss_png"]
