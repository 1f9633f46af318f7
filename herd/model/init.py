"""Random weights for presets and new models."""

from __future__ import annotations

import torch


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Random init for presets: N(0, std) for every matrix, ones for norm weights, zeros for biases
    (herd's documented scheme)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if isinstance(module, (torch.nn.LayerNorm,)) or name.endswith("norm.weight"):
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return model
