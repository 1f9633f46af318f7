"""bfloat16 weights stored in oneDNN's blocked layout, for inference on CPUs with native bf16.

On such CPUs (AVX512-BF16 or AMX) torch multiplies bfloat16 matrices with oneDNN, whose kernel
wants the weight in a blocked layout and reorders a plain (out, in) matrix into it on *every* call.
For one row (a decode step) that reorder is most of the work: measured on an AVX512-BF16 EPYC, 2
threads, a 1024 x 1024 matrix (one expert's projection) took 0.21 ms per product plain and 0.10 ms
packed, the 202,048 x 1024 output head 29 vs 19 ms. `pack` reorders the matrices of a text model
once, in place of the plain ones (no second copy is kept). The products are oneDNN's bf16 kernels
either way (float32 sums rounded to bf16); they may sum in another order, so a result can differ
from the plain layout's by one bf16 rounding step (tests/test_packed.py).

A packed model is for inference: `state_dict()` still returns plain tensors (unpacked on the fly),
so saving works; training, `.to()` and loading weights into it do not — `unpack` restores the plain
layout first.
"""

from __future__ import annotations

import torch
from torch import nn

from herd.model.layers import Linear, native_half_gemm
from herd.model.moe import Experts


def packable(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether weights of this dtype on this device are worth packing: bfloat16 on a CPU with native bf16 GEMMs."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and native_half_gemm(torch.bfloat16))


def can_pack(model: nn.Module) -> bool:
    """Whether `pack` would change this model (a TextModel)."""
    w = model.layers[0].attention.wq.weight
    return packable(w.dtype, w.device) and not w.is_mkldnn


def blocked(w: torch.Tensor) -> torch.Tensor:
    """A (out, in) bf16 matrix in oneDNN's blocked layout (an opaque mkldnn tensor of the same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


# Packing a matrix holds it twice for a moment: once a model is loaded, matrices above this share of
# its weights stay plain, so peak memory stays within 1.2x of the weights (tests/test_loading.py).
# The loader packs the output head first, before anything else is in memory (`load_model(pack_head=)`),
# so this limit only matters for models built otherwise (presets, tests).
MAX_SHARE = 1 / 16


@torch.no_grad()
def pack(model: nn.Module) -> bool:
    """Store every Linear weight and routed expert matrix of ``model`` (a TextModel) blocked, one at a
    time (peak memory: one matrix more), except matrices over MAX_SHARE of the weights and a compiled
    head. Returns False, changing nothing, when `can_pack` is False."""
    if not can_pack(model):
        return False
    limit = MAX_SHARE * sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if m is model.output and (model.head_gemv is not None or m.weight.numel() > limit):
            continue  # a compiled head reads the plain matrix (TextModel.compile_head); a big one stays plain
        if isinstance(m, Linear) and not m.weight.is_mkldnn:
            m.weight = nn.Parameter(blocked(m.weight), requires_grad=False)
        elif isinstance(m, Experts) and m.packed is None:
            E = m.w1.shape[0]
            m.packed = [tuple(blocked(getattr(m, name)[e]) for name in ("w1", "w3", "w2")) for e in range(E)]
            for name in ("w1", "w3", "w2"):  # the plain stacks go; shape and dtype stay known
                setattr(m, name, nn.Parameter(getattr(m, name).to("meta"), requires_grad=False))
    if not getattr(model, "_unpacks_state_dict", False):
        model._register_state_dict_hook(_plain_state_dict)
        model._unpacks_state_dict = True
    return True


@torch.no_grad()
def unpack(model: nn.Module) -> None:
    """The plain layout again (for training, `.to()`, or loading weights into the model)."""
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.is_mkldnn:
            m.weight = nn.Parameter(m.weight.to_dense(), requires_grad=False)
        elif isinstance(m, Experts) and m.packed is not None:
            for i, name in enumerate(("w1", "w3", "w2")):
                setattr(m, name, nn.Parameter(torch.stack([p[i].to_dense() for p in m.packed]), requires_grad=False))
            m.packed = None


def _plain_state_dict(model: nn.Module, state: dict, prefix: str, _metadata) -> dict:
    for name, m in model.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, Experts) and m.packed is not None:
            for i, w in enumerate(("w1", "w3", "w2")):
                state[f"{name}.{w}"] = torch.stack([p[i].to_dense() for p in m.packed])
    for key, t in state.items():
        if t.is_mkldnn:
            state[key] = t.to_dense()
    return state
