"""Training checkpoints: saved atomically, resumed exactly.

A checkpoint is a folder ``checkpoints/step-000100/`` holding the model (``model-rank0.safetensors``:
each process's local shards; on one process the whole model, or only the adapters for LoRA),
the optimizer state (``optimizer-rankN.pt``) and ``trainer.pt`` (step, scheduler, RNG states).
The data position is the step itself (see herd.train.data). Every file is written into
``step-000100.partial/`` and fsynced; the folder is then renamed and only then does the ``latest``
file (replaced atomically) point at it. A process killed at any moment therefore leaves
``latest`` naming a complete checkpoint; stale ``.partial`` folders are removed on the next start.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from herd.train.parallel import World, local_tensor


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    write(str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None; removes interrupted (.partial) saves."""
    folder = run_dir / "checkpoints"
    for stale in folder.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    pointer = folder / "latest"
    if not pointer.exists():
        return None
    path = folder / pointer.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise RuntimeError(f"{pointer}: names {path.name}, which is incomplete or missing")
    return path


def _optimizer_local(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    return {"state": {i: {k: local_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def _optimizer_restore(opt: torch.optim.Optimizer, saved: dict) -> None:
    from torch.distributed.tensor import DTensor
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        state[int(i)] = {k: DTensor.from_local(v, p.device_mesh, p.placements)
                         if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.dim() > 0 else v
                         for k, v in s.items()}
    opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _state(modules: Mapping[str, torch.nn.Module | None], trainable_only: bool) -> dict[str, torch.Tensor]:
    """The checkpointed tensors of every module under its key prefix ('' for the text model,
    'vision.' for the encoder): all of them, or only the trainable ones (LoRA adapters)."""
    out = {}
    for prefix, m in modules.items():
        if m is None:
            continue
        names = {n for n, p in m.named_parameters() if p.requires_grad} if trainable_only else None
        out |= {prefix + k: v for k, v in m.state_dict().items() if names is None or k in names}
    return out


def save(run_dir: Path, step: int, modules: Mapping[str, torch.nn.Module | None], opt, sched, world: World,
         keep: int, trainable_only: bool) -> Path:
    """Write checkpoint ``step`` (every rank calls this); returns its folder. ``modules``: key prefix
    -> module, e.g. {'': text model, 'vision.': vision encoder}."""
    folder = run_dir / "checkpoints"
    final = folder / f"step-{step:06d}"
    tmp = folder / f"step-{step:06d}.partial"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    tensors = {k: local_tensor(v).detach().contiguous() for k, v in _state(modules, trainable_only).items()}
    _write(tmp / f"model-rank{world.rank}.safetensors", lambda p: save_file(tensors, p))
    _write(tmp / f"optimizer-rank{world.rank}.pt", lambda p: torch.save(_optimizer_local(opt), p))
    world.barrier()
    if world.main:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _write(tmp / "trainer.pt", lambda p: torch.save(
            {"step": step, "scheduler": sched.state_dict(), "rng": rng, "world_size": world.size,
             "tensor_parallel": world.tp}, p))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = folder / "latest.tmp"
        _write(pointer, lambda p: Path(p).write_text(final.name))
        os.replace(pointer, folder / "latest")
        _fsync_dir(folder)
        done = sorted(p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def restore(path: Path, modules: Mapping[str, torch.nn.Module | None], opt, sched, world: World,
            trainable_only: bool) -> int:
    """Load a checkpoint into the built modules / optimizer / scheduler; returns its step. Every
    tensor `save` would write must be there (a checkpoint without the vision encoder is refused)."""
    from torch.distributed.tensor import DTensor
    meta = torch.load(path / "trainer.pt", weights_only=False)
    if meta["world_size"] != world.size:
        raise RuntimeError(f"{path}: saved by {meta['world_size']} processes; resume it with as many "
                           f"(this run has {world.size})")
    if meta.get("tensor_parallel", 1) != world.tp:
        raise RuntimeError(f"{path}: saved with distributed.tensor_parallel = {meta.get('tensor_parallel', 1)}; "
                           f"resume it with the same (this run has {world.tp})")
    tensors = load_file(str(path / f"model-rank{world.rank}.safetensors"))
    own = _state(modules, trainable_only)
    unknown, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
    if unknown:
        raise RuntimeError(f"{path}: tensors {unknown[:3]} do not belong to this model (config changed?)")
    if missing:
        raise RuntimeError(f"{path}: tensors {missing[:3]} of this model are missing ({len(missing)} in all; "
                           f"config changed?)")
    with torch.no_grad():
        for k, t in tensors.items():
            target = own[k]
            dst = target.to_local() if isinstance(target, DTensor) else target
            if dst.shape != t.shape:
                raise RuntimeError(f"{path}: tensor {k} has shape {tuple(t.shape)}, the model has {tuple(dst.shape)}")
            dst.copy_(t)
    _optimizer_restore(opt, torch.load(path / f"optimizer-rank{world.rank}.pt", weights_only=False))
    sched.load_state_dict(meta["scheduler"])
    rng = meta["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(meta["step"])
