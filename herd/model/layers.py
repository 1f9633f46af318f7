"""Small building blocks of the text decoder: RMSNorm, rotary embedding, SwiGLU.

Shape legend (all model files): B batch, T tokens, D model width, F FFN width, E experts,
K experts per token, H query heads, G KV heads, Dh head width, N tokens flattened (B*T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import RopeScaling


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last dim, computed in float32 and cast back (Meta and HF both do):
    x * rsqrt(mean(x^2) + eps), as torch's one op."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back to x's dtype, then scale: the references' exact order.
        return rms_norm(x, self.eps) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [Dh/2] in float32 on the CPU, with llama3-style scaling when configured."""
    # Always computed on the CPU (even inside a meta-device context): it is tiny and needs real values.
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv
    # llama3 scaling: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_context / scaling.low_freq_factor
    high_wavelen = scaling.original_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    if between.any():  # empty when low == high (Scout): avoids the 0/0 of the blend formula
        smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        scaled = torch.where(between, blended, scaled)
    return scaled


def rope_rotations(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^(i p f) [..., Dh/2] for integer positions [...]: computed on demand,
    never tabled to the maximum length."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of x [..., T, H, Dh] by rot [..., T, Dh/2] (complex64),
    in float32 — Meta's complex form, not the half-split one. Broadcasts over the heads."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, H, Dh/2)
    return torch.view_as_real(xc * rot.unsqueeze(-2)).flatten(-2).type_as(x)


class Linear(nn.Linear):
    """nn.Linear with an optional ``adapter`` (a module set from outside, e.g. LoRA in training)
    whose output of the same input is added: y = x W^T + b + adapter(x)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y if self.adapter is None else y + self.adapter(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b (herd.kernels swaps in device kernels)."""
        return F.linear(x, self.weight, self.bias)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, linear=F.linear) -> torch.Tensor:
    """w2(silu(w1 x) * w3 x) on raw (out, in) weights: one routed expert, or a slice of one."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense FFN and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
