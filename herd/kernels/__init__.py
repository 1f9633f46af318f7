"""Device fast paths, applied to a plain herd model from outside.

herd/model computes with the reference ops only. `apply` swaps the class of each module it has a
faster path for (a subclass that overrides one method and adds no state: parameters, state-dict
names and adapters stay as they are), per device:

- CPU: weight products by shape, dtype and CPU features (`cpu.linear`), the float32 head stored
  column-major, the image encoder serialised against the decode GEMV's oneDNN switch;
- any device: one-query cached attention (`attention`), decode's few (token, expert) pairs
  without a sort (`moe`); CUDA: grouped-GEMM experts, fused attention without cuDNN.

`herd.load(..., kernels=False)` skips all of it and runs the reference model.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.kernels import cpu, native
from herd.kernels.attention import FastAttention
from herd.kernels.moe import CPUExperts, FastMoE
from herd.model.attention import Attention
from herd.model.layers import Linear, RMSNorm
from herd.model.moe import Experts, MoE
from herd.model.transformer import TextModel
from herd.model.vision import VisionModel


class CPULinear(Linear):
    def product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu.linear(x, self.weight, self.bias)


class CPURMSNorm(RMSNorm):
    """The norm in one native call where herd's kernels take it (bfloat16 on AVX512-BF16 CPUs): torch's
    float32 rms_norm of a decode row costs a dozen small ops. Bitwise the reference's result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if y is None else y


class CompiledHead(CPULinear):
    """The output head whose one-row product is a compiled float32 GEMV (see `compile_head`)."""

    _gemv = None  # compiled once per process, on first use

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or self.adapter is not None:
            return super().product(x)
        if CompiledHead._gemv is None:
            CompiledHead._gemv = torch.compile(cpu.gemv_float32, dynamic=False)
        return CompiledHead._gemv(x.reshape(-1), self.weight).view(*x.shape[:-1], -1)


class SerialVision(VisionModel):
    """The vision encoder holding cpu.ONEDNN_SWITCH per call: the server encodes images on a worker
    thread while decode GEMVs switch oneDNN off on the engine's thread."""

    def forward(self, *args, **kwargs):
        with cpu.ONEDNN_SWITCH:
            return super().forward(*args, **kwargs)


def _swaps(device: torch.device) -> dict[type, type]:
    swaps: dict[type, type] = {Attention: FastAttention, MoE: FastMoE}
    if device.type == "cpu":
        swaps |= {Linear: CPULinear, Experts: CPUExperts, VisionModel: SerialVision, RMSNorm: CPURMSNorm}
    return swaps


def apply(model: TextModel, vision: VisionModel | None = None) -> TextModel:
    """Install the fast paths for the device the model's weights are on (in place; returns ``model``)."""
    device = model.tok_embeddings.weight.device
    swaps = _swaps(device)
    for module in [*model.modules(), *(vision.modules() if vision is not None else ())]:
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
    w = getattr(model.output, "weight", None)  # a quantized head has none
    if w is not None and cpu.head_column_major(w.shape, w.dtype, device) and w.stride(0) != 1:
        w.data = cpu.to_column_major(w.data)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` on ``model`` (any modules): every module back to its reference class."""
    for module in model.modules():
        base = type(module)
        while base.__module__.startswith("herd.kernels"):
            base = base.__bases__[0]
        module.__class__ = base
    return model


def compile_head(model: TextModel) -> bool:
    """Batch-1 decode's output product through a kernel torch.compile generates, for half-precision
    weights on a CPU: float32 sums of the exact products instead of bf16-rounded logits. Costs a
    compilation at the first step (~20 s on a fresh machine). Returns whether it applies."""
    w = getattr(model.output, "weight", None)
    if w is None or w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16):
        return False
    model.output.__class__ = CompiledHead
    return True


def cache_dtype(weight_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The KV cache's dtype with kernels: the weights' one, except float32 for half-precision weights
    on a CPU, where half-precision attention matmuls run 10-50x slower than float32 ones; a CPU with
    AMX and bf16 weights keeps bf16 (faster there, as transformers keeps it)."""
    if torch.device(device).type == "cpu" and weight_dtype in (torch.bfloat16, torch.float16):
        return torch.bfloat16 if weight_dtype == torch.bfloat16 and cpu.amx_bf16() else torch.float32
    return weight_dtype
