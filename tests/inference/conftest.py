"""The CPU kernels these tests test: a test module that needs them fails, rather than skips,
when they did not build (a skip would hide that nothing was tested)."""

from __future__ import annotations

import pytest

from fusionlm.inference.cpu_kernels import load_kernels


@pytest.fixture(scope="session")
def kernels() -> None:
    assert load_kernels(), "fusionlm's CPU kernels did not build (is a C++ compiler installed?)"
