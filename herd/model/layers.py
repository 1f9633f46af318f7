"""Small building blocks of the text decoder: RMSNorm, rotary embedding, SwiGLU.

Shape legend (all model files): B batch, T tokens, D model width, F FFN width, E experts,
K experts per token, H query heads, G KV heads, Dh head width, N tokens flattened (B*T).
"""

from __future__ import annotations

import functools
import math
import threading

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


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b). Half precision on a CPU takes one of four ways, whichever is fastest there:

    - up to 128 rows (decode steps, short prompts, an expert's rows) in bf16 on a CPU with AMX:
      w @ x.T by oneDNN (see `_weight_left`), except one row by a small weight (below
      `_ONEDNN_GEMV_MIN` elements: a router, Llama 4's narrow K/V projections), which takes torch's GEMV.
    - one row (batch-1 decode) on any other CPU: torch's own GEMV (see `_half_gemv`), float32 sums
      rounded once.
    - 16 or more rows on a CPU without native half-precision dot products (AVX2, AVX-512 without
      BF16): in float32. Such CPUs run half-precision GEMMs 3-7x slower than float32 ones, and
      upcasting the weight for the call costs one pass over it (measured on AVX2: a 4096 x 1024 weight
      breaks even at 8-16 rows). Very tall weights (the output head) are upcast in blocks of rows, so
      no float32 copy of the whole matrix is ever made.
    - otherwise the plain call: 2-15 rows on CPUs without native dot products, many rows on CPUs
      with them (oneDNN's native bf16 GEMM, 2.4-2.9x faster than the upcast: 512 x 1024 x 4096, AVX512-BF16 EPYC).
    """
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    half_cpu = x.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
    amx = half_cpu and w.dtype == torch.bfloat16 and amx_bf16()
    if half_cpu and rows == 1 and not (amx and w.numel() >= _ONEDNN_GEMV_MIN):
        return _half_gemv(x, w, b)
    if amx and 0 < rows <= _WEIGHT_LEFT_ROWS:
        return _weight_left(x, w, b)
    if not half_cpu or rows < 16 or native_half_gemm(w.dtype):
        return F.linear(x, w, b)
    xf, bf = x.float(), None if b is None else b.float()
    if w.shape[0] <= _UPCAST_BLOCK * 8:
        return F.linear(xf, w.float(), bf).to(x.dtype)
    out = torch.cat([F.linear(xf, w[i:i + _UPCAST_BLOCK].float()) for i in range(0, w.shape[0], _UPCAST_BLOCK)], -1)
    return (out if bf is None else out + bf).to(x.dtype)


_WEIGHT_LEFT_ROWS = 128
# Below this many weight elements a one-row product on an AMX CPU takes torch's GEMV: oneDNN's call
# costs ~20 us before it reads anything (measured on a Xeon with AMX, 2 threads, cold bf16 weights:
# 16 x 1024 4.1 us against 24.7, 256 x 1024 20.9 against 36.7, even at 512 x 1024, 1024 x 1024 123.7
# against 100.2; a batch-1 decode step of the benchmark model 29.6 ms against 30.4).
_ONEDNN_GEMV_MIN = 512 * 1024


def _weight_left(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T computed as (w @ x.T).T, for a few rows on a CPU with AMX: oneDNN then runs a brgemm
    with the weight as the tall left operand, read as it lies, where x @ w.T first reorders the
    weight into its blocked layout. Same sums (bitwise equal here). Measured on a Xeon with AMX, 2
    threads, bf16: the 202,048 x 1024 output head 15.4-16.0 ms for one row against 26.9-27.2 by
    torch's GEMV (`_half_gemv`), 16.7 ms for 8 rows and 22.2 for 64 against 25.0 and 46.6 by
    F.linear; a cold 1024 x 1024 weight 116-136 us against 160-180 for 8-32 rows; at 512 rows
    F.linear wins (1.08 ms against 1.36). A batch-1 decode step of the benchmark model: 29.3-31.1 ms
    against 41.1-41.5 by torch's GEMV."""
    x2 = x.reshape(-1, x.shape[-1])
    # one row as a matrix-vector product: as a 1-column mm oneDNN takes another kernel (21 ms for the head)
    y = torch.mv(w, x2[0]) if x2.shape[0] == 1 else torch.mm(w, x2.t()).t().contiguous()
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


# oneDNN's on/off switch is process-wide, and torch has no per-call way around it (every product
# op asks it: mv, addmv, matmul). `_half_gemv` holds this lock while the switch is off; work on
# another thread whose products must take oneDNN as configured holds it too (the server's image
# encoder, see LLM.image_features), else its bf16 GEMMs could land on torch's kernels for a moment:
# other rounding, so the same request could give other tokens depending on what else ran.
ONEDNN_SWITCH = threading.RLock()


def _half_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One row x [..., D] times a half-precision (out, in) matrix on the CPU by torch's GEMV kernel:
    float32 dot products over the rows of w, rounded once. oneDNN is switched off for the call (under
    `ONEDNN_SWITCH`): on CPUs without AMX its product reorders w into its blocked layout first.
    Measured on an AVX512-BF16 EPYC (no AMX), 2 threads: the 202,048 x 1024 head 14-16 ms (29 GB/s)
    against 33 ms, a cold 1024 x 1024 expert matrix 0.085 ms against 0.19 (and 0.13 even with w
    stored pre-blocked); on AVX2 oneDNN's call also rounds the sums more than once
    (tests/test_half_precision.py)."""
    with ONEDNN_SWITCH:
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            y = torch.mv(w, x.reshape(-1))
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


@functools.cache
def amx_bf16() -> bool:
    """Whether this CPU has AMX tiles (Xeon Sapphire Rapids and later), on which oneDNN runs bf16
    products of a few rows fastest with the weight on the left (see `_weight_left`), and a bf16 KV
    cache is faster than a float32 one (see herd.engine.cache.cache_dtype)."""
    return torch.cpu._is_amx_tile_supported()


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has dot-product instructions for ``dtype`` (bf16: AVX512-BF16 or AMX; fp16: AMX-FP16),
    which oneDNN's GEMMs behind torch use."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    return dtype == torch.float16 and cpu._is_amx_fp16_supported()


_UPCAST_BLOCK = 1024


def gemv_column_major(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a weight of this shape multiplies one row fastest stored column-major (same shape,
    strides (1, rows)): on a CPU in float32, for tall matrices such as the output head. MKL's
    one-row product over a (vocab, D) row-major head runs on one core; over the column-major one
    it streams on all (measured here, 202,048 rows: 2.7x faster at D=64, 1.25x at D=1024).
    Half precision is the other way round (its column-major kernel is ~20x slower)."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and len(shape) == 2
            and shape[0] >= 16 * shape[1])


def to_column_major(w: torch.Tensor) -> torch.Tensor:
    """The same matrix with strides (1, rows); in-place users and state_dict see no difference."""
    return w.t().contiguous().t()


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) that multiplies with :func:`linear`.

    ``adapter`` (None, or a module set from outside, e.g. a LoRA adapter in training) adds its
    output of the same input: y = x W^T + b + adapter(x).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return y if self.adapter is None else y + self.adapter(x)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
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
