"""The models shipped inside the package, loadable by name (herd.load("herd-tiny"))."""

from __future__ import annotations

import os
from pathlib import Path

from herd.checkpoint.errors import CheckpointError

MODELS_DIR = Path(__file__).parent
MODELS = ("herd-tiny",)


def model_folder(name: str) -> str:
    """The folder behind a name: an embedded model's ("herd-tiny") where no such path exists, else ``name``."""
    if name in MODELS and not Path(name).exists():
        folder = os.fspath(MODELS_DIR / name)
        if not (Path(folder) / "config.json").is_file():
            raise CheckpointError(f"{folder}: the embedded model '{name}' is missing from this installation "
                                  f"(rebuild it with scripts/train-herd-tiny)")
        return folder
    return name
