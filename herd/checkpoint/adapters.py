"""LoRA adapters on disk: adapter_model.safetensors + adapter_config.json (rank, alpha, targets)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from herd.checkpoint.errors import check_tensors
from herd.model.lora import add_adapters, adapter_state, merge
from herd.model.transformer import TextModel

ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def save_adapters(model: TextModel, folder: str | Path, rank: int, alpha: float, targets: list[str],
                  base: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(
        {"format": "herd-lora", "rank": rank, "alpha": alpha, "targets": targets, "base_model": base}, indent=2))
    return folder


def load_adapters(model: TextModel, folder: str | Path) -> None:
    """Attach the adapters saved in ``folder`` (checked against this model) and merge them in."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(folder / ADAPTER_FILE))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: not a herd adapter folder ({e})") from None
    if meta.get("format") != "herd-lora":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: format is {meta.get('format')!r}, expected 'herd-lora'")
    add_adapters(model, int(meta["rank"]), float(meta["alpha"]), list(meta["targets"]))
    check_tensors(str(folder / ADAPTER_FILE), tensors, adapter_state(model), "adapters that fit this model")
    model.load_state_dict(tensors, strict=False)
    merge(model)
