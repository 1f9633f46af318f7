"""herd's own CPU kernels (native.c) for weight-only int8 and int4 weights with bfloat16 activations:
products of a few rows (decode), int8 products of tens (blocked), and dequantization into bf16 tiles
for products of many (prefill).

They are built on first use with the machine's C compiler (``$CC``, else cc, gcc or clang) for the
machine's own CPU, kept in ``$HERD_CACHE`` (default ~/.cache/herd), and called through ctypes.
Where they cannot be built herd says so once and falls back to torch's kernels (decode is then
slower: int8 about half as fast); ``HERD_NATIVE_KERNELS=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]  # as for an AVX2 CPU (tests, benchmarks)


def _cpu_id() -> str:
    """What -march=native depends on: a cache shared by several machines keeps one build per CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler() -> str | None:
    return os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (and one line on stderr saying why) where they cannot be had."""
    if os.environ.get("HERD_NATIVE_KERNELS", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        print("herd: no C compiler found (set CC); decode uses torch's slower kernels", file=sys.stderr)
        return None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd")) / "kernels"
    built = cache / f"native-{key}.so"
    if not built.exists():
        try:
            _build(cc, cache, built)
        except (OSError, subprocess.CalledProcessError) as e:
            why = e.stderr.strip()[-2000:] if isinstance(e, subprocess.CalledProcessError) else str(e)
            print(f"herd: building {SOURCE} with {cc} failed, so decode uses torch's slower kernels:\n{why}",
                  file=sys.stderr)
            return None
    lib = ctypes.CDLL(str(built))
    lib.herd_level.restype = ctypes.c_int
    if lib.herd_level() >= 1:
        lib.herd_int8_rows_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    if lib.herd_level() == 1:
        lib.herd_int4_rows_avx2.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
        lib.herd_int8_dequantize_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        lib.herd_int4_dequantize_f32.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6
    if lib.herd_level() >= 2:
        lib.herd_int4_rows_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
        lib.herd_int8_dequantize_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        lib.herd_int4_dequantize_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5
        lib.herd_int8_gemm_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]
        lib.herd_rms_norm_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    return lib


def _build(cc: str, cache: Path, built: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # several processes may build at once
        out = Path(tmp) / built.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True, check=True)
        os.replace(out, built)


@functools.cache
def level() -> int:
    """What the build for this CPU holds: 2, every kernel (AVX512-BF16); 1, the int8 and int4 row
    kernels and float32 tiles (AVX2 and FMA); 0, nothing (no compiler, another CPU, or turned off)."""
    lib = library()
    return 0 if lib is None else lib.herd_level()


def _ready() -> bool:
    return level() == 2


def _bf16_product(x: torch.Tensor, scale: torch.Tensor) -> bool:
    return (x.dtype == scale.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not (x.requires_grad and torch.is_grad_enabled()))


def usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether all of herd's int8 kernels take this product (the rows and the tiles): bfloat16
    activations and scales on a CPU with AVX512-BF16, no gradient."""
    return _bf16_product(x, scale) and level() == 2


def int8_rows_usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether herd's int8 row kernel takes this product: as `usable`, on AVX512-BF16 or AVX2 CPUs."""
    return _bf16_product(x, scale) and level() >= 1


def int8_rows(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] * scale[:, None])ᵀ -> [M, N], all but q in bfloat16."""
    x2, q, scale = x2.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(x2.shape[0], q.shape[0], dtype=x2.dtype)
    library().herd_int8_rows_bf16(x2.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), x2.shape[0], q.shape[0],
                                  x2.shape[1])
    return y


def int8_gemm(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As `int8_rows`, for tens of rows: blocks of 16 weight rows converted once, in cache (native.c)."""
    x2, q, scale = x2.contiguous(), q.contiguous(), scale.contiguous()
    (M, K), N, threads = x2.shape, q.shape[0], torch.get_num_threads()
    y = torch.empty(M, N, dtype=x2.dtype)
    scratch = torch.empty(threads * 16 * ((K + 63) // 64 * 64), dtype=torch.bfloat16)
    library().herd_int8_gemm_bf16(x2.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), M, N, K,
                                  scratch.data_ptr(), threads)
    return y


def one_row(mode: str, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, group: int,
            block: int) -> torch.Tensor | None:
    """Decode's product of one row, the hot path in as few Python steps as it takes (each product of a
    step would otherwise spend more in checks than a small matrix takes to stream): x [..., K] with
    one row in bfloat16 times W in either mode (int4 in torch's CPU packing, blocks of ``block`` rows);
    None where the row kernels do not take it."""
    if not (x.dtype is scales.dtype is torch.bfloat16 and x.numel() == x.shape[-1] and not x.is_cuda
            and level() >= 1 and not (x.requires_grad and torch.is_grad_enabled())):
        return None
    x, values, scales = x.contiguous(), values.contiguous(), scales.contiguous()
    if mode == "int8":
        N = values.shape[0]
        y = torch.empty(x.shape[:-1] + (N,), dtype=torch.bfloat16)
        library().herd_int8_rows_bf16(x.data_ptr(), values.data_ptr(), scales.data_ptr(), y.data_ptr(), 1, N,
                                      x.shape[-1])
        return y
    N = scales.shape[1]
    if not int4_rows_usable(scales, block):
        return None
    y = torch.empty(x.shape[:-1] + (N,), dtype=torch.bfloat16)
    _int4_rows_into(x, values, scales, y, 1, N, x.shape[-1], group, block)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """`herd.model.layers.rms_norm` of bfloat16 x over its last dim, times ``weight`` (bfloat16) where
    given, in one call; None where the kernel does not take it (another dtype, a gradient)."""
    if not (x.dtype is torch.bfloat16 and (weight is None or weight.dtype is torch.bfloat16) and not x.is_cuda
            and _ready() and not ((x.requires_grad or weight is not None and weight.requires_grad)
                                  and torch.is_grad_enabled())):
        return None
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    D = x.shape[-1]
    library().herd_rms_norm_bf16(x.data_ptr(), 0 if weight is None else weight.contiguous().data_ptr(), y.data_ptr(),
                                 x.numel() // D if D else 0, D, eps)
    return y


def tiles_usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether herd's dequantized tiles take a product of many rows: bfloat16 tiles with AVX512-BF16
    (`usable`), float32 ones with AVX2 (their GEMMs run in float32 there, as `cpu.upcast`'s)."""
    return _bf16_product(x, scale) and level() >= 1


def tile_dtype() -> torch.dtype:
    """The dtype of this build's dequantized tiles."""
    return torch.bfloat16 if level() == 2 else torch.float32


def _scratch(out: torch.Tensor | None, *shape: int) -> torch.Tensor:
    """A tensor of ``shape`` in `tile_dtype`: the front of ``out`` (a buffer reused tile after tile: fresh
    pages for each 10 MB tile of Scout's experts cost as much as dequantizing it), else a new one."""
    if out is None:
        return torch.empty(shape, dtype=tile_dtype())
    return out.view(-1)[:shape[0] * shape[1]].view(shape)


def int8_dequantized(q: torch.Tensor, scale: torch.Tensor, begin: int, end: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows begin..end of W = q * scale[:, None] in `tile_dtype` (bfloat16 rounded once, as torch's bf16
    product; or float32); written into ``out`` (of that dtype, large enough) when given."""
    q, scale = q.contiguous(), scale.contiguous()
    w = _scratch(out, end - begin, q.shape[1])
    dequantize = library().herd_int8_dequantize_bf16 if level() == 2 else library().herd_int8_dequantize_f32
    dequantize(q.data_ptr(), scale.data_ptr(), w.data_ptr(), q.shape[1], begin, end)
    return w


def int4_usable(x: torch.Tensor, scale_zero: torch.Tensor, block: int) -> bool:
    """Whether the AVX512-BF16 build's int4 kernels take this product (several rows; the tiles as
    `int4_rows_usable` says): as `usable`, for torch's AVX-512 packing (blocks of 64 rows) of a width
    that is whole blocks."""
    return block == 64 and scale_zero.shape[1] % 64 == 0 and usable(x, scale_zero)


def int4_rows_usable(scale_zero: torch.Tensor, block: int) -> bool:
    """Whether an int4 row kernel takes products with this matrix (bfloat16 activations assumed): the
    AVX512-BF16 one for blocks of 64 rows, the AVX2 one for either packing, of a width of whole blocks."""
    return (scale_zero.dtype is torch.bfloat16 and scale_zero.shape[1] % block == 0
            and (level() == 2 and block == 64 or level() == 1))


def _int4_rows_into(x, packed, scale_zero, y, M: int, N: int, K: int, group: int, block: int) -> None:
    if level() == 2:
        library().herd_int4_rows_bf16(x.data_ptr(), packed.data_ptr(), scale_zero.data_ptr(), y.data_ptr(), M, N, K,
                                      group)
    else:
        library().herd_int4_rows_avx2(x.data_ptr(), packed.data_ptr(), scale_zero.data_ptr(), y.data_ptr(), M, N, K,
                                      group, block)


def int4_rows(x2: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int,
              block: int = 64) -> torch.Tensor:
    """x [M, K] @ Wᵀ for W in torch's CPU int4 packing (quant.py) -> [M, N], all but W in bfloat16."""
    x2, packed, scale_zero = x2.contiguous(), packed.contiguous(), scale_zero.contiguous()
    (M, K), N = x2.shape, scale_zero.shape[1]
    y = torch.empty(M, N, dtype=x2.dtype)
    _int4_rows_into(x2, packed, scale_zero, y, M, N, K, group, block)
    return y


def int4_dequantized_t(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, K: int, begin: int = 0,
                       end: int | None = None, out: torch.Tensor | None = None, block: int = 64) -> torch.Tensor:
    """Columns begin..end (whole blocks) of Wᵀ [K, N] in `tile_dtype`, for W in torch's CPU int4 packing
    (blocks of ``block`` rows; 64 for the bfloat16 tiles), rounded once from float32; written into ``out``
    when given, as `int8_dequantized`."""
    packed, scale_zero = packed.contiguous(), scale_zero.contiguous()
    N = scale_zero.shape[1]
    end = N if end is None else end
    w_t = _scratch(out, K, end - begin)
    if level() == 2:
        library().herd_int4_dequantize_bf16(packed.data_ptr(), scale_zero.data_ptr(), w_t.data_ptr(), N, K, group,
                                            begin, end)
    else:
        library().herd_int4_dequantize_f32(packed.data_ptr(), scale_zero.data_ptr(), w_t.data_ptr(), N, K, group,
                                           block, begin, end)
    return w_t
