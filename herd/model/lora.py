"""LoRA: low-rank adapters on attention, the shared expert, every routed expert, dense FFNs and
the output head.

An adapted projection computes x W^T + (alpha / r) * (x A^T) B^T with A [r, in] ~ N(0, 1/r) and
B [out, r] = 0, so training starts from the base model exactly (Hu et al., 2021). The adapters hang
on the model's hooks (`Linear.adapter`, `Experts.adapter`, and the same hooks of the quantized
modules herd.kernels.quant swaps in: QLoRA): no base weight is copied or replaced, and the delta of
a routed expert is computed on that expert's tokens only. ``merge`` folds W += (alpha / r) B A into
the weights and removes the adapters (herd.checkpoint.adapters writes and reads adapters alone).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.model.layers import Linear, SwiGLU
from herd.model.moe import Experts, MoE
from herd.model.transformer import TextModel

class LoRA(nn.Module):
    """The adapter of one Linear [out, in]: A [r, in], B [out, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, gen: torch.Generator | None):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(rank))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.A.dtype) @ self.A.t() @ self.B.t() * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A * self.scale  # [out, in]


class ExpertsLoRA(nn.Module):
    """Adapters of every routed expert's three projections: A_p [E, r, in], B_p [E, out, r]."""

    def __init__(self, num_experts: int, dim: int, hidden: int, rank: int, alpha: float, gen: torch.Generator | None):
        super().__init__()
        self.scale = alpha / rank
        shapes = {"w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}  # (out, in)
        for name, (out, inp) in shapes.items():
            self.register_parameter(f"{name}_A", nn.Parameter(torch.randn(num_experts, rank, inp, generator=gen)
                                                               / math.sqrt(rank)))
            self.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(num_experts, out, rank)))

    def delta(self, name: str, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        A, B = getattr(self, f"{name}_A")[e], getattr(self, f"{name}_B")[e]
        return (x_ND.to(A.dtype) @ A.t() @ B.t() * self.scale).to(x_ND.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_B") @ getattr(self, f"{name}_A") * self.scale  # [E, out, in]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name."""
    return {k: v for k, v in model.state_dict().items() if ".adapter." in k}


def _targets(model: TextModel, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Experts (or quantized twin) the targets name."""
    found = []
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        if "attention" in targets:
            att = block.attention
            found += [(f"{prefix}attention.{n}", getattr(att, n)) for n in ("wq", "wk", "wv", "wo")]
        ffn = block.feed_forward
        if isinstance(ffn, MoE):
            if "shared_expert" in targets:
                found += [(f"{prefix}feed_forward.shared_expert.{n}", getattr(ffn.shared_expert, n))
                          for n in ("w1", "w3", "w2")]
            if "experts" in targets:
                found.append((f"{prefix}feed_forward.experts", ffn.experts))
        elif isinstance(ffn, SwiGLU) and "dense_ffn" in targets:
            found += [(f"{prefix}feed_forward.{n}", getattr(ffn, n)) for n in ("w1", "w3", "w2")]
    if "output" in targets:
        found.append(("output", model.output))
    return found


def add_adapters(model: TextModel, rank: int, alpha: float, targets: list[str], seed: int = 0) -> int:
    """Attach fresh adapters and freeze everything else; returns the number of trainable parameters."""
    gen = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    for _, module in _targets(model, targets):
        # Linear or a quantized linear (both have in/out_features), Experts or quantized experts (dims).
        if hasattr(module, "in_features"):
            adapter = LoRA(module.in_features, module.out_features, rank, alpha, gen)
        else:
            adapter = ExpertsLoRA(module.num_experts, *module.dims, rank, alpha, gen)
        module.adapter = adapter.to(device=next(iter(module.state_dict().values())).device)
    n = sum(p.numel() for _, m in _targets(model, targets) for p in m.adapter.parameters())
    if n == 0:
        raise ValueError(f"lora.targets {targets} match no layer of this model")
    return n


@torch.no_grad()
def merge(model: TextModel) -> None:
    """W += (alpha / r) B A for every adapter, then drop the adapters: a plain model again. A quantized
    base cannot take the sum: merge into its dequantized state (herd.kernels.quant.plain_state)."""
    for name, module in model.named_modules():
        adapter = getattr(module, "adapter", None)
        if adapter is not None and not isinstance(module, (Linear, Experts)):
            raise ValueError(f"{name}: a quantized {type(module).__name__} cannot take merged weights; merge into "
                             "the model's dequantized state (herd.kernels.quant.plain_state)")
        if isinstance(adapter, LoRA):
            module.weight += adapter.delta_weight().to(module.weight.dtype)
        elif isinstance(adapter, ExpertsLoRA):
            for name in ("w1", "w3", "w2"):
                getattr(module, name).add_(adapter.delta_weight(name).to(module.w1.dtype))
        else:
            continue
        module.adapter = None
