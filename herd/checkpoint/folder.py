"""What a checkpoint folder carries beside its weights: processor and tokenizer files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from herd.checkpoint.errors import CheckpointError
from herd.tokenizer.tokenizer import Tokenizer

# Files a checkpoint folder may carry beside its weights that herd reads or passes on when saving.
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer_config.json")


def carried_files(folder: str | os.PathLike | None, tokenizer: Tokenizer) -> dict[str, Path]:
    """name -> path of the files a saved model takes along: the tokenizer's file and the
    PROCESSOR_FILES found in ``folder`` (where the model came from)."""
    out = {f: Path(folder) / f for f in PROCESSOR_FILES if folder is not None and (Path(folder) / f).is_file()}
    if tokenizer.path is not None:
        out[tokenizer.path.name] = tokenizer.path
    return out


def folder_max_tiles(folder: str | os.PathLike) -> int | None:
    """Tiles per image a checkpoint was trained with: ``max_patches`` of its preprocessor_config.json
    (transformers' Llama4ImageProcessor name), or None when the folder does not say."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("max_patches")
    except (ValueError, AttributeError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable JSON object ({e})") from None
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{path}: max_patches must be a positive integer, got {value!r}")
    return value
