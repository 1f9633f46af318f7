"""Weight products on a CPU, by the kernel that is fastest for their shape, dtype and CPU.

torch's default for x @ w.T is oneDNN, which is slow for the shapes decode makes (one or a few
rows) and, on CPUs without bf16 dot products, for half-precision GEMMs of any size. `linear`
routes around it; every route gives float32 sums rounded once, as the plain product does (they may
sum in another order). docs/performance.md has the measurements behind each threshold.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

WEIGHT_LEFT_ROWS = 128  # up to this many rows, AMX CPUs multiply as w @ x.T
ONEDNN_GEMV_MIN = 512 * 1024  # smaller weights take torch's GEMV even with AMX: oneDNN's call costs ~20 us
UPCAST_BLOCK = 1024  # rows of a tall weight upcast to float32 at a time

# oneDNN's on/off switch is process-wide and torch has no per-call way around it. `half_gemv` holds
# this lock while the switch is off; products on other threads that must run as configured (the
# server's image encoder) hold it too, else their rounding could depend on what else runs.
ONEDNN_SWITCH = threading.RLock()


@functools.cache
def amx_bf16() -> bool:
    """Whether this CPU has AMX tiles (Xeon Sapphire Rapids and later)."""
    return torch.cpu._is_amx_tile_supported()


@functools.cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has dot-product instructions for ``dtype`` (bf16: AVX512-BF16 or AMX; fp16:
    AMX-FP16), which oneDNN's GEMMs use."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    return dtype == torch.float16 and cpu._is_amx_fp16_supported()


def route(rows: int, w: torch.Tensor) -> str:
    """Which way `linear` multiplies ``rows`` rows of a CPU tensor by ``w``: 'gemv', 'weight_left',
    'upcast' or 'plain'."""
    if w.dtype not in (torch.bfloat16, torch.float16):
        return "plain"
    amx = w.dtype == torch.bfloat16 and amx_bf16()
    if rows == 1 and not (amx and w.numel() >= ONEDNN_GEMV_MIN):
        return "gemv"
    if amx and 0 < rows <= WEIGHT_LEFT_ROWS:
        return "weight_left"
    if rows < 16 or native_half_gemm(w.dtype):
        return "plain"
    return "upcast"  # no half-precision dot products: float32 GEMMs are 3-7x faster than half ones


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b), as F.linear computes it, by the fastest kernel for a CPU tensor."""
    if x.device.type != "cpu":
        return F.linear(x, w, b)
    way = route(x.numel() // x.shape[-1] if x.numel() else 0, w)
    if way == "gemv":
        return half_gemv(x, w, b)
    if way == "weight_left":
        return weight_left(x, w, b)
    if way == "upcast":
        return upcast(x, w, b)
    return F.linear(x, w, b)


def weight_left(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T as (w @ x.T).T: with AMX, oneDNN then reads the weight as it lies instead of first
    reordering it into its blocked layout. Bitwise the same sums."""
    x2 = x.reshape(-1, x.shape[-1])
    # one row as a matrix-vector product: as a 1-column mm oneDNN takes a slower kernel
    y = torch.mv(w, x2[0]) if x2.shape[0] == 1 else torch.mm(w, x2.t()).t().contiguous()
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def half_gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One row x [..., D] times a half-precision (out, in) matrix by torch's own GEMV, float32 sums
    rounded once. oneDNN is off for the call: without AMX it reorders w before every product."""
    with ONEDNN_SWITCH:
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            y = torch.mv(w, x.reshape(-1))
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def upcast(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T in float32, rounded back: for CPUs without half-precision dot products. Tall weights
    (the output head) are upcast in blocks of rows, so no float32 copy of the whole matrix exists."""
    xf, bf = x.float(), None if b is None else b.float()
    if w.shape[0] <= UPCAST_BLOCK * 8:
        return F.linear(xf, w.float(), bf).to(x.dtype)
    out = torch.cat([F.linear(xf, w[i:i + UPCAST_BLOCK].float()) for i in range(0, w.shape[0], UPCAST_BLOCK)], -1)
    return (out if bf is None else out + bf).to(x.dtype)


def head_column_major(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a weight of this shape multiplies one row fastest stored column-major (strides (1, rows)):
    tall float32 matrices (the output head) on a CPU, where MKL's row-major one-row product uses one
    core. Half precision is the other way round."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and len(shape) == 2
            and shape[0] >= 16 * shape[1])


def to_column_major(w: torch.Tensor) -> torch.Tensor:
    """The same matrix with strides (1, rows); in-place users and state_dict see no difference."""
    return w.t().contiguous().t()


def gemv_float32(x_D: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """w x as float32 sums of the exact products, written elementwise so torch.compile emits one
    streaming loop (see `herd.kernels.compile_head`)."""
    return (w_VD.float() * x_D.float()).sum(-1)
