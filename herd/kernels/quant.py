"""Weight-only quantization: int8 per output channel, int4 in groups along the input, applied from
outside the model while it loads.

A quantized matrix is stored as its kernel wants it: int8 values [N, K] and one scale per output
row; or int4 values packed by torch's CPU packing (`_convert_weight_to_int4pack_for_cpu`, [N, K/2]
bytes) with a scale and a zero per group of ``group`` inputs ([K/group, N, 2]). Scales are kept in
the activations' dtype, which the kernels require. FP8 (CUDA, compute capability 8.9+) keeps float8
e4m3 values [N, K] and a float32 scale per output row, and quantizes each row of the activations on
the fly (W8A8, FP8-dynamic's and Meta's rowwise scheme) for torch._scaled_mm. A few rows (decode) multiply through torch's
weight-only kernels; more rows (prefill) dequantize the matrix and take the dtype's GEMM, which is
faster there (docs/performance.md has the crossover). Training through a quantized base (QLoRA:
frozen base, LoRA adapters on the modules' ``adapter`` hooks) and autocast take the dequantized
weight, differentiable in the input.

What is quantized is named by module kinds (`MODULES`): by default the routed experts, fused
stacks [E, F, D] included, and the shared expert; attention, dense FFNs and the output head on
request. The router, norms, embeddings and the vision encoder keep their dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from herd.checkpoint.compressed import QuantizedWeight
from herd.kernels import cpu, native
from herd.model.moe import Experts, MoE
from herd.model.layers import SwiGLU
from herd.model.transformer import TextModel

MODES = ("int8", "int4", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
GROUPS = (32, 64, 128, 256)
MODULES = ("experts", "shared_expert", "dense_ffn", "attention", "output")
DEFAULT_MODULES = ("experts", "shared_expert")
# Up to this many rows torch's weight-only kernels beat dequantize-then-GEMM (AVX512 EPYC, 2 threads):
# int8's dequantization is one cheap pass, int4's costs as much as ~250 rows through its kernel.
# Without half-precision dot products (AVX2) torch's int8 kernel wins up to TILED_FROM rows.
FEW_ROWS = {"int8": 16, "int4": 256}
# Where herd's own kernels build (native.py): its row kernels up to NATIVE_ROWS rows, then torch's
# kernel, and from TILED_FROM rows on tiles dequantized to bf16 (float32 on AVX2) through the GEMM.
# herd's int8 row kernel takes several rows only while they fit in 16 KB (L1), else torch's kernel
# wins at 2-4 rows; from INT8_GEMM_FROM rows its blocked kernel (AVX512-BF16) beats both and the
# tiles, up to TILED_FROM rows and, for inputs of GEMM_WIDE or more, at any count
# (docs/quantization.md has the crossovers).
NATIVE_ROWS = {"int8": 8, "int4": 64}
TILED_FROM = {"int8": 65, "int4": 65}
INT8_GEMM_FROM, GEMM_WIDE = 5, 4096
INT8_ROWS_BYTES = 16 * 1024


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: ``mode`` 'int8', 'int4' or 'fp8', int4's ``group`` size, and which module kinds."""

    mode: str
    group: int = 128
    modules: tuple[str, ...] = DEFAULT_MODULES

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"quantize must be one of {', '.join(MODES)} (or None), got {self.mode!r}")
        if self.group not in GROUPS:
            raise ValueError(f"quantize group must be one of {', '.join(map(str, GROUPS))}, got {self.group!r}")
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise ValueError(f"quantize_modules must name some of {', '.join(MODULES)}, got {list(self.modules)!r}")
        object.__setattr__(self, "modules", tuple(self.modules))


# ---- one matrix ---------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (values [N, K] int8, scales [N] in ``dtype``); w ≈ values * scale."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``group`` inputs with an integer zero point z (0..15) per group:
    w ≈ (q - z) * scale, q in 0..15 (the scheme of GPTQ and compressed-tensors, so a quantized model
    saves exactly). Returns torch's packing of q ([N, K/2] uint8) and the kernel's form of scale and
    zero, [K/group, N, 2] in ``dtype``: w = (q - 8) * scale + (8 - z) * scale."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)
    lo, hi = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)  # 0 on the grid: z is whole
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype).float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), _scale_zero(scale, zero, dtype)


def fp8_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] in float8 e4m3 with its own float32 scale [M, 1], its largest magnitude at
    e4m3's largest value: the weights' per-channel scheme, and the activations' dynamic per-token one."""
    xf = x2.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 e4m3: (values [N, K], scales [N] float32); w ≈ values * scale."""
    q, scale = fp8_rows(w)
    return q, scale.view(-1)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale[:, None])ᵀ with x's rows quantized to float8 on the fly: one torch._scaled_mm with
    rowwise scales (float32 sums on the GPU's FP8 tensor cores; bfloat16 out, as the kernel requires)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], q.shape[0])
    xq, sx = fp8_rows(x2)
    y = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=scale[None], out_dtype=torch.bfloat16)
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def _scale_zero(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] scales (already rounded to ``dtype``) and integer zero points -> the kernel's [G, N, 2]."""
    return torch.stack([scale, (8 - zero) * scale], dim=-1).to(dtype).transpose(0, 1).contiguous()


def int4_zero_points(scale_zero: torch.Tensor) -> torch.Tensor:
    """The integer zero points [N, G] (0..15) behind the kernel's [G, N, 2] scales and offsets."""
    sz = scale_zero.float()
    return (8 - torch.round(sz[..., 1] / sz[..., 0])).t().to(torch.int8)


@functools.cache
def _int4_slots(rows: int) -> torch.Tensor:
    """For a block of ``rows`` output rows, the row each nibble slot of one input column holds in
    torch's CPU int4 packing (it depends on the CPU's vector width, so it is asked, not assumed)."""
    K = 32
    n = torch.arange(rows, dtype=torch.int32)[:, None].expand(rows, K)
    lo = torch.ops.aten._convert_weight_to_int4pack_for_cpu((n % 16).contiguous(), 1)
    hi = torch.ops.aten._convert_weight_to_int4pack_for_cpu((n // 16).contiguous(), 1)
    nib = lambda p: torch.stack([p & 15, p >> 4], -1).reshape(-1)  # noqa: E731  bytes -> nibbles, low first
    return (nib(lo) + 16 * nib(hi)).long()  # slot -> row, for every column


@functools.cache
def _int4_block() -> int:
    """Output rows per block of torch's CPU int4 packing (64 with AVX-512, else 32)."""
    first = _int4_slots(128)[:64]  # a 64-row block's first column would hold rows 0..63
    return 64 if sorted(first.tolist()) == list(range(64)) else 32


@functools.cache
def _int4_rows(N: int) -> torch.Tensor:
    """The output row held at each slot of the packing's column-major order, for N rows."""
    block = _int4_block()
    full = N // block * block
    rows = [n0 + _int4_slots(block)[:block] for n0 in range(0, full, block)]
    if N > full:
        rows.append(full + _int4_slots(N - full)[:N - full])
    return torch.cat(rows)


def _int4_slot_major(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The packed values as [K, N] (uint8, 0..15) with the N columns in slot order (`_int4_rows`):
    no gather over the weight, only nibble splits and one transposing copy."""
    block = _int4_block()
    flat = packed.reshape(-1)
    full = N // block * block
    parts = []
    for n0, rows, size in ((0, full, block), (full, N - full, N - full)):
        if rows:
            chunk = flat[n0 * K // 2:(n0 + rows) * K // 2].view(rows // size, K, size // 2)
            nibbles = torch.stack([chunk & 15, chunk >> 4], -1).view(rows // size, K, size)
            parts.append(nibbles.permute(1, 0, 2).reshape(K, rows))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def unpack_int4(packed: torch.Tensor, N: int, K: int, scale_zero: torch.Tensor | None = None,
                group: int = 0) -> torch.Tensor:
    """torch's int4 packing [N, K/2] back to values [N, K] (uint8, 0..15, on the CPU). The CUDA packing
    needs the matrix's ``scale_zero`` and ``group``: its values are read back from the dequantized weight."""
    if packed.device.type == "cuda":
        w = dequantize_int4(packed, scale_zero, group, N, K, torch.float32)
        s, z = (scale_zero[..., i].float().t().repeat_interleave(group, dim=1) for i in (0, 1))
        return (torch.round((w - z) / s) + 8).clamp(0, 15).to(torch.uint8).cpu()
    out = torch.empty(N, K, dtype=torch.uint8)
    out[_int4_rows(N)] = _int4_slot_major(packed, N, K).t()
    return out


def _dequantize_slot_major(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, N: int, K: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ [K, N] in ``dtype``, its N columns in slot order (`_int4_rows`): cheap to undo the packing."""
    sz = scale_zero[:, _int4_rows(N)].to(dtype)  # [K/g, N, 2] in slot order
    w_t = _int4_slot_major(packed, N, K).to(dtype).view(K // group, group, N)
    return ((w_t - 8) * sz[:, None, :, 0] + sz[:, None, :, 1]).view(K, N)


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, N: int, K: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in ``dtype``: w = (q - 8) * scale + zero."""
    if packed.device.type == "cuda":  # the kernel times the identity: Wᵀ, as the kernel computes with it
        eye = torch.eye(K, dtype=scale_zero.dtype, device=packed.device)
        return torch.ops.aten._weight_int4pack_mm(eye, packed, group, scale_zero).t().to(dtype)
    w = torch.empty(N, K, dtype=dtype)
    w[_int4_rows(N)] = _dequantize_slot_major(packed, scale_zero, group, N, K, dtype).t()
    return w


def _int4_matmul(x2: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ Wᵀ for many rows: W dequantized in slot order, multiplied, and the output's
    columns put back in row order."""
    K, N = x2.shape[1], scale_zero.shape[1]
    y = torch.empty(x2.shape[0], N, dtype=x2.dtype)
    y[:, _int4_rows(N)] = cpu.linear(x2, _dequantize_slot_major(packed, scale_zero, group, N, K, x2.dtype).t())
    return y


def _tiled_matmul(x2: torch.Tensor, N: int, tile_t: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [M, K] @ Wᵀ for many rows, W dequantized 1024 output rows at a time: ``tile_t(n0, n1, buffer)``
    gives Wᵀ[:, n0:n1] in the tiles' dtype (`native.tile_dtype`: bf16, or float32 where bf16 GEMMs are
    slow; x is cast to it and the product rounded back), written into one buffer reused by every tile.
    A whole dequantized matrix would be new pages each call (Scout's experts: 84 MB); narrower tiles
    make the GEMM slower (docs/quantization.md)."""
    dtype = native.tile_dtype()
    xs = x2.to(dtype)
    y = torch.empty(x2.shape[0], N, dtype=dtype, device=x2.device)
    buffer = torch.empty(min(N, 1024) * x2.shape[1], dtype=dtype, device=x2.device)
    for n0 in range(0, N, 1024):
        n1 = min(n0 + 1024, N)
        y[:, n0:n1] = xs @ tile_t(n0, n1, buffer)
    return y.to(x2.dtype)


def _slow_half_gemm(x2: torch.Tensor) -> bool:
    """Half-precision activations on a CPU without half-precision dot products (AVX2), whose GEMMs then
    run in float32 (`cpu.upcast`)."""
    half = x2.dtype in (torch.bfloat16, torch.float16)
    return half and x2.device.type == "cpu" and not cpu.native_half_gemm(x2.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    rows, own = x2.shape[0], native.usable(x2, scale)
    if q.device.type == "cuda":  # no weight-only int8 kernel in torch for CUDA: the products, then the scales
        y = F.linear(x2, q.to(x.dtype)) * scale
    elif own and rows >= INT8_GEMM_FROM and (rows < TILED_FROM["int8"] or x2.shape[1] >= GEMM_WIDE):
        y = native.int8_gemm(x2, q, scale)
    elif native.int8_rows_usable(x2, scale) and (rows == 1 or rows <= NATIVE_ROWS["int8"] and
                                                  x2.numel() * x2.element_size() <= INT8_ROWS_BYTES):
        y = native.int8_rows(x2, q, scale)
    elif native.tiles_usable(x2, scale) and rows >= TILED_FROM["int8"]:
        y = _tiled_matmul(x2, q.shape[0], lambda n0, n1, buf: native.int8_dequantized(q, scale, n0, n1, buf).t())
    elif x2.shape[1] % 16 == 0 and (rows <= FEW_ROWS["int8"] or rows < TILED_FROM["int8"] and _slow_half_gemm(x2)):
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale)  # it sums other widths wrong
    else:
        y = cpu.linear(x2, q.to(x.dtype) * scale[:, None])
    return y.view(*x.shape[:-1], q.shape[0])


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    (rows, K), N, block = x2.shape, scale_zero.shape[1], _int4_block()
    own = native.int4_usable(x2, scale_zero, block)
    if packed.device.type == "cuda":  # tinygemm, any number of rows (bfloat16 only)
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), packed, group, scale_zero)
    elif own and rows <= NATIVE_ROWS["int4"]:
        y = native.int4_rows(x2, packed, scale_zero, group)
    elif native.int4_rows_usable(scale_zero, block) and native.tiles_usable(x2, scale_zero) and \
            rows >= TILED_FROM["int4"]:  # tiles of 1024 rows: whole blocks of either packing
        y = _tiled_matmul(x2, N, lambda n0, n1, buf: native.int4_dequantized_t(packed, scale_zero, group, K, n0, n1,
                                                                                buf, block))
    elif rows <= FEW_ROWS["int4"]:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group, scale_zero)
    else:
        y = _int4_matmul(x2, packed, scale_zero, group)
    return y.view(*x.shape[:-1], N)


# ---- modules ------------------------------------------------------------------------------------


def _matmul(mode: str, group: int, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if mode != "fp8" and not torch.is_autocast_enabled("cpu"):
        y = native.one_row(mode, x, values, scales, group, _int4_block() if mode == "int4" else 0)
        if y is not None:
            return y
    # The kernels take no gradient and no autocast, and the integer ones only the scales' dtype (fp8's
    # are float32): training (QLoRA) and mixed dtypes go through the dequantized weight instead.
    if (x.requires_grad and torch.is_grad_enabled()) or (mode != "fp8" and x.dtype != scales.dtype) or \
            torch.is_autocast_enabled(x.device.type):
        return _DequantizedProduct.apply(x, mode, group, values, scales)
    if mode == "fp8":
        return fp8_linear(x, values, scales)
    if mode == "int8":
        return int8_linear(x, values, scales)
    return int4_linear(x, values, scales, group)


def _dequantize(mode: str, group: int, values: torch.Tensor, scales: torch.Tensor, out_f: int,
                in_f: int) -> torch.Tensor:
    """The weight [out, in] the quantized values stand for, in the scales' dtype (fp8: float32)."""
    if mode in ("int8", "fp8"):
        return values.to(scales.dtype) * scales[:, None]
    return dequantize_int4(values, scales, group, out_f, in_f, scales.dtype)


class _DequantizedProduct(torch.autograd.Function):
    """x @ Wᵀ with W dequantized, differentiable in x (adapters in earlier layers need the gradient
    through the frozen base). The backward dequantizes W again rather than keeping it, so a training
    step holds no full-precision copy of the base."""

    @staticmethod
    def forward(ctx, x, mode: str, group: int, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.mode, ctx.group, ctx.in_f, ctx.x_dtype = mode, group, x.shape[-1], x.dtype
        ctx.save_for_backward(values, scales)  # the quantized buffers themselves: no copy
        w = _dequantize(mode, group, values, scales, values.shape[0], x.shape[-1])
        return F.linear(x, w.to(x.dtype))  # under autocast, in the autocast dtype like any Linear

    @staticmethod
    def backward(ctx, grad):
        values, scales = ctx.saved_tensors
        w = _dequantize(ctx.mode, ctx.group, values, scales, values.shape[0], ctx.in_f)
        return (grad @ w.to(grad.dtype)).to(ctx.x_dtype), None, None, None, None


class QuantLinear(nn.Module):
    """A bias-free Linear with quantized weights (state: int8 ``weight_q`` + ``weight_scale``, int4
    ``weight_packed`` + ``weight_scale_zero``, or fp8 ``weight_fp8`` + ``weight_scale``); ``adapter`` as
    Linear's."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, dtype: torch.dtype,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.in_features, self.out_features, self.mode, self.group = in_features, out_features, spec.mode, spec.group
        self.adapter: nn.Module | None = None
        self.names = [name for name, _, _ in _shapes(spec, out_features, in_features, dtype)]  # values, scales
        for name, shape, dt in _shapes(spec, out_features, in_features, dtype):
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scales = self._buffers[self.names[0]], self._buffers[self.names[1]]
        y = _matmul(self.mode, self.group, x, values, scales)
        return y if self.adapter is None else y + self.adapter(x)

    def dequantized(self) -> torch.Tensor:
        return _dequantize(self.mode, self.group, *(getattr(self, n) for n in self.names), self.out_features,
                           self.in_features)


class QuantExperts(nn.Module):
    """E routed experts with quantized stacks: per projection the int8 values [E, out, in] and scales
    [E, out], or int4 packed [E, out, in/2] and scales and zeros [E, in/group, out, 2]."""

    def __init__(self, num_experts: int, dim: int, hidden: int, spec: QuantSpec, dtype: torch.dtype,
                 device: torch.device | str = "meta"):
        super().__init__()
        self.num_experts, self.mode, self.group, self.dims = num_experts, spec.mode, spec.group, (dim, hidden)
        self.shapes = {"w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden)}
        self.adapter: nn.Module | None = None  # as Experts' (LoRA: QLoRA in training)
        self.names = [name for name, _, _ in _shapes(spec, dim, dim, dtype)]  # values, scales
        for proj, (out_f, in_f) in self.shapes.items():
            for name, shape, dt in _shapes(spec, out_f, in_f, dtype):
                self.register_buffer(f"{proj}_{name}", torch.empty((num_experts, *shape), dtype=dt, device=device))

    def _state(self, proj: str, e: int) -> list[torch.Tensor]:
        return [getattr(self, f"{proj}_{n}")[e] for n in self.names]

    def product(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self.mode, self.group, x, *self._state(proj, e))

    def one(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens [N, D] -> [N, D]; touches only expert e's weights."""
        a = self.adapter
        gate, up = self.product("w1", e, x_ND), self.product("w3", e, x_ND)
        if a is not None:
            gate, up = gate + a.delta("w1", e, x_ND), up + a.delta("w3", e, x_ND)
        h = F.silu(gate) * up
        y = self.product("w2", e, h)
        return y if a is None else y + a.delta("w2", e, h)

    def dequantized(self, proj: str, e: int) -> torch.Tensor:
        return _dequantize(self.mode, self.group, *self._state(proj, e), *self.shapes[proj])


def _shapes(spec: QuantSpec, out_f: int, in_f: int, dtype: torch.dtype):
    if spec.mode == "fp8":
        return [("weight_fp8", (out_f, in_f), FP8), ("weight_scale", (out_f,), torch.float32)]
    if spec.mode == "int8":
        return [("weight_q", (out_f, in_f), torch.int8), ("weight_scale", (out_f,), dtype)]
    return [("weight_packed", (out_f, in_f // 2), torch.uint8),
            ("weight_scale_zero", (in_f // spec.group, out_f, 2), dtype)]


def stored(module: QuantLinear | QuantExperts, proj: str | None = None) -> QuantizedWeight:
    """A quantized module's weight (``proj`` of experts) in a checkpoint's integer form (signed
    values, scales [.., N, K/group], zero points): exactly what it computes with."""
    if isinstance(module, QuantExperts):
        experts = getattr(module, f"{proj}_{module.names[0]}").shape[0]  # mid-`narrow`, not num_experts
        return QuantizedWeight.stack([_stored(module.mode, module.group, *module._state(proj, e),
                                              *module.shapes[proj]) for e in range(experts)])
    return _stored(module.mode, module.group, *(getattr(module, n) for n in module.names), module.out_features,
                   module.in_features)


def _stored(mode: str, group: int, values: torch.Tensor, scales: torch.Tensor, N: int, K: int) -> QuantizedWeight:
    if mode == "fp8":
        return QuantizedWeight(values.cpu(), scales[:, None].cpu(), None, (N, K), K, 8, "float")
    if mode == "int8":
        return QuantizedWeight(values.cpu(), scales[:, None].cpu(), None, (N, K), K, 8, "int")
    q = (unpack_int4(values, N, K, scales, group).to(torch.int8) - 8)
    scales = scales.cpu()
    return QuantizedWeight(q, scales[..., 0].t().contiguous(), int4_zero_points(scales) - 8, (N, K), group, 4, "int")


# ---- CUDA ----------------------------------------------------------------------------------------
# Unrun so far (no GPU has been lent): int4 through torch's tinygemm kernel (`_weight_int4pack_mm`,
# bfloat16), int8 as products then scales. benchmarks/gpu.py checks both against the dequantized
# model and times them.


def _inner_k_tiles(K: int) -> int:
    return 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2


def _int4_to_cuda(packed: torch.Tensor, scale_zero: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One matrix's CPU int4 packing as tinygemm's CUDA packing (from [N, K/2] bytes, high nibble first)."""
    N, K = scale_zero.shape[1], packed.shape[-1] * 2
    q = unpack_int4(packed, N, K)
    pairs = (q[:, 0::2] << 4) | q[:, 1::2]
    return torch.ops.aten._convert_weight_to_int4pack(pairs.to(device), _inner_k_tiles(K))


def check_fp8_device(device: str | torch.device) -> None:
    """FP8 products need a GPU with FP8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper and
    later); torch's CPU _scaled_mm is a slow reference, so a CPU is refused too."""
    device = torch.device(device)
    if device.type == "meta":
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return
    where = f"compute capability {torch.cuda.get_device_capability(device)}" if device.type == "cuda" else device.type
    raise ValueError(f"quantize='fp8' runs on CUDA GPUs of compute capability 8.9+ (FP8 tensor cores), not on {where}: "
                     "there load an FP8 checkpoint as it is (dequantized to bf16) or with quantize='int8' (one "
                     "byte per weight)")


def to_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Every quantized module's state onto ``device`` in its kernel's layout there (CUDA: tinygemm's
    int4 packing, built expert by expert); a CUDA int4 model computes in bfloat16."""
    device = torch.device(device)
    for m in model.modules():
        if not isinstance(m, (QuantLinear, QuantExperts)):
            continue
        if m.mode == "int4" and device.type == "cuda" and getattr(m, m.names[1]).dtype != torch.bfloat16:
            raise ValueError("int4 on CUDA runs in bfloat16 (torch's tinygemm kernel); load with dtype='bfloat16'")
        if m.mode == "fp8":
            check_fp8_device(device)
        prefixes = [""] if isinstance(m, QuantLinear) else [f"{p}_" for p in m.shapes]
        for prefix in prefixes:
            values, scales = (getattr(m, prefix + n) for n in m.names)
            if m.mode == "int4" and device.type == "cuda" and values.device.type == "cpu":
                values = (_int4_to_cuda(values, scales, device) if values.dim() == 2 else
                          torch.stack([_int4_to_cuda(v, s, device) for v, s in zip(values, scales)]))
            setattr(m, prefix + m.names[0], values.to(device))
            setattr(m, prefix + m.names[1], scales.to(device))
    return model


# ---- whole models ---------------------------------------------------------------------------------


def targets(model: TextModel, spec: QuantSpec) -> dict[str, nn.Module]:
    """Module name -> module, for every module ``spec`` quantizes."""
    out = {}
    for i, block in model.layers.named_children():  # a pipeline stage's layers keep their indices
        ffn, p = block.feed_forward, f"layers.{i}."
        if isinstance(ffn, MoE):
            if "experts" in spec.modules:
                out[p + "feed_forward.experts"] = ffn.experts
            if "shared_expert" in spec.modules:
                out |= {f"{p}feed_forward.shared_expert.{w}": getattr(ffn.shared_expert, w) for w in ("w1", "w3", "w2")}
        elif isinstance(ffn, SwiGLU) and "dense_ffn" in spec.modules:
            out |= {f"{p}feed_forward.{w}": getattr(ffn, w) for w in ("w1", "w3", "w2")}
        if "attention" in spec.modules:
            out |= {f"{p}attention.{w}": getattr(block.attention, w) for w in ("wq", "wk", "wv", "wo")}
    if "output" in spec.modules:
        out["output"] = model.output
    return out


def check(model: TextModel, spec: QuantSpec) -> None:
    """Every shape the kernels must take, checked before any weight is read: int4 needs the input
    width divisible by the group and the output width by 16, fp8 both widths divisible by 16."""
    for name, m in targets(model, spec).items():
        mats = ({f"{name}.{p}": (m.w1.shape[1:] if p != "w2" else m.w2.shape[1:]) for p in ("w1", "w3", "w2")}
                if isinstance(m, Experts) else {f"{name}.weight": m.weight.shape})
        for tensor, (out_f, in_f) in mats.items():
            if spec.mode == "int4" and (in_f % spec.group or out_f % 16):
                tp = getattr(model, "tp", None)
                part = f" (a tensor-parallel rank's part of {tp.size})" if tp is not None and tp.size > 1 else ""
                raise ValueError(f"{tensor} [{out_f}, {in_f}]{part}: int4 needs the input width divisible by the "
                                 f"group ({spec.group}) and the output width by 16; try another group or int8")
            if spec.mode == "fp8" and (in_f % 16 or out_f % 16):
                raise ValueError(f"{tensor} [{out_f}, {in_f}]: fp8 (torch._scaled_mm) needs both widths divisible "
                                 "by 16; try int8")


@dataclass(frozen=True)
class Quantizer:
    """Turns one checkpoint tensor into a quantized module's state: ``fn(weight, done)``. With ``cut``
    (dim, start, length: an int8 weight a tensor-parallel rank keeps part of its input), the loader
    passes the whole weight, quantized whole and then cut, since each row's scale is its whole row's:
    the rank computes with exactly the integers and scales one process would."""

    fn: Callable[..., dict[str, torch.Tensor]]
    cut: tuple[int, int, int] | None = None

    def __call__(self, w, done: Callable[[torch.Tensor], None] = lambda t: None) -> dict[str, torch.Tensor]:
        state = self.fn(w, done)
        if self.cut is None:
            return state
        dim, start, length = self.cut
        return {k: v.narrow(dim, start, length).contiguous() if k.endswith(("weight_q", "weight_fp8")) else v
                for k, v in state.items()}


def install(model: TextModel, spec: QuantSpec, dtype: torch.dtype, only: Collection[str] | None = None,
            parts: Mapping[str, tuple[int, int, int, int]] | None = None) -> dict[str, Quantizer]:
    """Replace the targeted modules of a model built on the meta device by empty quantized ones;
    returns checkpoint tensor name -> `Quantizer` (weight -> {state name: quantized tensor}).
    ``only``: herd tensor names; a module none of whose weights is among them keeps its dtype
    (a quantized checkpoint's own choice of modules). ``parts``: the parts of each tensor a
    tensor-parallel rank keeps (herd.distributed.tensor.parts), the model already sharded to them."""
    check(model, spec)
    parts = parts or {}
    quantizers: dict[str, Quantizer] = {}

    def cut(key: str, dims: int) -> tuple[int, int, int] | None:
        # A checkpoint's own integers are cut as stored (each row's scale whole), not quantized again.
        part = parts.get(key)
        stored_int = only is not None and key in only
        return tuple(part[:3]) if spec.mode in ("int8", "fp8") and part is not None and part[0] == dims - 1 and \
            not stored_int else None

    for name, m in targets(model, spec).items():
        if only is not None and not any(f"{name}.{w}" in only for w in ("weight", "w1", "w3", "w2")):
            continue
        parent, _, attr = name.rpartition(".")
        if isinstance(m, Experts):
            E, hidden, dim = m.w1.shape
            setattr(model.get_submodule(parent), attr, QuantExperts(E, dim, hidden, spec, dtype))
            for proj in ("w1", "w3", "w2"):
                quantizers[f"{name}.{proj}"] = Quantizer(
                    functools.partial(_quantize_stack, f"{name}.{proj}_", spec, dtype), cut(f"{name}.{proj}", 3))
        else:
            setattr(model.get_submodule(parent), attr, QuantLinear(m.in_features, m.out_features, spec, dtype))
            quantizers[f"{name}.weight"] = Quantizer(functools.partial(_quantize_one, f"{name}.", spec, dtype),
                                                     cut(f"{name}.weight", 2))
    return quantizers


def narrow(module: QuantLinear | QuantExperts, proj: str | None, dim: int, start: int, length: int,
           size: int | None = None) -> None:
    """Keep part ``[start, start + length)`` along ``dim`` of a quantized module's weight (``proj`` of
    experts; dims as the unquantized weight's), in place: the same integers and scales, cut (a
    tensor-parallel rank's part of a model quantized whole); then zero rows up to ``size`` rows (the
    output head's last part), quantized as zeros quantize. Refused where int4's groups would be cut."""
    w = stored(module, proj).narrow(dim, start, length)
    if w is None:
        raise ValueError(f"cannot keep inputs {start}..{start + length} of a weight in int4 groups of {module.group}: "
                         "the part must be whole groups (try a smaller group or int8)")
    dtype = w.scale.dtype
    spec = QuantSpec(module.mode, module.group)
    if size is not None and size > length:
        K = w.shape[-1]
        zeros = torch.zeros(size - length, K)
        pad = _stored(spec.mode, spec.group, *_quantized(spec, zeros, dtype), size - length, K)
        w = replace(w, data=torch.cat([w.data, pad.data]), scale=torch.cat([w.scale, pad.scale]),
                    zero=None if w.zero is None else torch.cat([w.zero, pad.zero]), shape=(size, K))
    rows = w.shape[-2]
    if spec.mode == "int4" and rows % 16:
        raise ValueError(f"a part of {rows} output rows cannot be packed as int4 (it needs a multiple of 16); "
                         "use int8 or fewer ranks")
    experts = isinstance(module, QuantExperts)
    state = _quantize_stack(f"{proj}_", spec, dtype, w) if experts else _quantize_one("", spec, dtype, w)
    for k, v in state.items():
        setattr(module, k, v)
    if experts:
        module.num_experts, module.shapes[proj] = w.shape[0], w.shape[1:]
        module.dims = module.shapes["w1"][::-1]
    else:
        module.out_features, module.in_features = w.shape


def _quantize_one(prefix: str, spec: QuantSpec, dtype: torch.dtype, w,
                  done: Callable[[torch.Tensor], None] = lambda t: None) -> dict[str, torch.Tensor]:
    """One weight [out, in] (a tensor, or a checkpoint's `QuantizedWeight`) in the kernel's layout."""
    if isinstance(w, QuantizedWeight):
        state = _from_checkpoint(spec, w, dtype)
        if state is None:  # another scheme: dequantize and quantize anew
            state = _quantize_one("", spec, dtype, w.dequantize(torch.float32))
        for t in w.tensors():
            done(t)
        return {prefix + k: v for k, v in state.items()}
    values, scales = _quantized(spec, w, dtype)
    done(w)
    return {prefix + name: t for (name, _, _), t in zip(_shapes(spec, 1, 1, dtype), (values, scales))}


def _quantized(spec: QuantSpec, w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix's (values, scales) in ``spec``'s mode."""
    if spec.mode == "fp8":
        return quantize_fp8(w)
    return quantize_int8(w, dtype) if spec.mode == "int8" else quantize_int4(w, spec.group, dtype)


def _from_checkpoint(spec: QuantSpec, w: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """A checkpoint's weights in the kernel's layout as they are, when the scheme allows: int8 per
    channel, symmetric, for int8; int4 in groups that are multiples of ``spec.group`` for int4; float8
    e4m3 per channel or per tensor for fp8."""
    N, K = w.shape
    if spec.mode == "fp8" or w.kind == "float":
        if spec.mode != "fp8" or w.kind != "float" or w.data.dtype != FP8 or w.group != K or w.zero is not None:
            return None
        return {"weight_fp8": w.values().contiguous(), "weight_scale": w.scale.reshape(N).float().contiguous()}
    if w.kind != "int" or (w.bits, spec.mode) not in ((8, "int8"), (4, "int4")):
        return None
    if spec.mode == "int8":
        if w.group != K or w.zero is not None:
            return None
        return {"weight_q": w.values().contiguous(), "weight_scale": w.scale.reshape(N).to(dtype)}
    if w.group % spec.group:
        return None
    repeat = w.group // spec.group
    scale = w.scale.to(dtype).float().repeat_interleave(repeat, dim=1)
    zero = (torch.zeros_like(scale) if w.zero is None else w.zero.float().repeat_interleave(repeat, dim=1)) + 8
    q = (w.values().to(torch.int32) + 8).contiguous()  # 0..15; zero points alike
    return {"weight_packed": torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
            "weight_scale_zero": _scale_zero(scale, zero, dtype)}


def _quantize_stack(prefix: str, spec: QuantSpec, dtype: torch.dtype, w,
                    done: Callable[[torch.Tensor], None] = lambda t: None) -> dict[str, torch.Tensor]:
    """A stack [E, out, in] expert by expert (``done`` is told each expert's source slice, so a loader
    can let its file pages go): at no time more than one expert exists unquantized in float32."""
    parts = []
    for e in range(w.shape[0]):
        parts.append(_quantize_one("", spec, dtype, w[e], done))
    return {prefix + k: torch.stack([p[k] for p in parts]) for k in parts[0]}


def quantize_model(model: TextModel, spec: QuantSpec) -> TextModel:
    """Quantize a model already in memory (presets, tests): each targeted module's weights are
    quantized and the module replaced, one at a time."""
    dtype = model.tok_embeddings.weight.dtype
    weights = {name: ({p: getattr(m, p).data.cpu() for p in ("w1", "w3", "w2")} if isinstance(m, Experts)
                      else m.weight.data.cpu())  # quantized on the CPU; `to_device` lays a GPU's out
               for name, m in targets(model, spec).items()}
    with torch.device("meta"):
        quantizers = install(model, spec, dtype)
    for name, w in weights.items():
        state = {}
        for key, weight in (w.items() if isinstance(w, dict) else [("weight", w)]):
            state |= quantizers[f"{name}.{key}"](weight)
        module = model.get_submodule(name)  # the quantized module now at that name
        for key, value in state.items():
            setattr(module, key[len(name) + 1:], value)
    return model


def plain_state(model: nn.Module, dequantized: bool = False) -> dict:
    """The state dict of the plain model a quantized one stands for, under the unquantized names
    (``weight``; ``w1``, ``w3``, ``w2`` [E, out, in]): each quantized weight as a `QuantizedWeight`
    (a checkpoint's integer form), or with ``dequantized`` as the weight it computes with, in its
    scales' dtype, and then every tensor new (none shares memory with ``model``; adapters included)."""
    state, replaced = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = m.dequantized() if dequantized else stored(m)
            replaced |= {f"{name}.{n}" for n in m.names}
        elif isinstance(m, QuantExperts):
            for proj in m.shapes:
                state[f"{name}.{proj}"] = (torch.stack([m.dequantized(proj, e) for e in range(m.num_experts)])
                                           if dequantized else stored(m, proj))
                replaced |= {f"{name}.{proj}_{n}" for n in m.names}
    rest = {k: v for k, v in model.state_dict().items() if k not in replaced}
    return state | ({k: v.detach().clone() for k, v in rest.items()} if dequantized else rest)
