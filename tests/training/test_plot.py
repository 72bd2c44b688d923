"""The loss curve: a PNG matplotlib draws, and a clear message without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import PIL.Image
import pytest

from fusionlm.training.plot import write_loss_png

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours


def test_the_curve_has_both_series(tmp_path):
    train = [(step, 3.0 / step) for step in range(1, 21)] + [(21, float("nan"))]
    path = write_loss_png(tmp_path / "loss.png", train, [(10, 0.5), (20, 0.4)])
    with PIL.Image.open(path) as picture:
        assert picture.size == (1280, 800)
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in np.unique(pixels, axis=0)}
    assert BLUE in colours and ORANGE in colours


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'fusionlm\[plot\]'"):
        write_loss_png(tmp_path / "loss.png", [(1, 1.0)])
    assert not (tmp_path / "loss.png").exists()
