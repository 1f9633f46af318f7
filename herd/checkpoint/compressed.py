"""Quantized Hugging Face checkpoints in the `compressed-tensors` layout, read and written.

It is the layout of meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8, of RedHat's Llama 4
quantizations and of everything llm-compressor writes; vLLM and SGLang read it. config.json holds
a ``quantization_config`` (``quant_method: compressed-tensors``, a ``format``, scheme groups,
an ``ignore`` list) and each quantized Linear ``X`` stores, in place of ``X.weight``:

    pack-quantized   X.weight_packed int32 [N, K*bits/32]: values q + 2^(bits-1), low bits first;
                     X.weight_scale [N, K/g] or [N, 1]; X.weight_shape [2];
                     X.weight_zero_point int32 [N*bits/32, K/g] (packed down the rows) if asymmetric
    float-quantized  X.weight float8_e4m3fn [N, K]; X.weight_scale [N, 1], [1] or blocks [N/b, K/b]
    naive-quantized  X.weight int8 [N, K]; X.weight_scale; X.weight_zero_point if asymmetric

with w = (q - zero_point) * scale. A quantized Llama 4 stores its routed experts one by one
(``feed_forward.experts.{e}.gate_proj``, ``up_proj``, ``down_proj``), since quantizers work on
Linear modules; herd.checkpoint.hf reads both that and the fused bf16 layout.

`CompressedSource` shows such a folder as plain ``X.weight`` tensors whose values are
`QuantizedWeight`s, so a load can turn them into herd's kernel layout as they are (no second
rounding, herd.kernels.quant) or dequantize them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from herd.checkpoint.errors import CheckpointError

FORMATS = ("pack-quantized", "float-quantized", "naive-quantized")
_AUX = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "input_scale")


@dataclass(frozen=True)
class Scheme:
    """One config group's weight quantization: bits, 'int' or 'float', symmetric, strategy, group size."""

    bits: int
    kind: str
    symmetric: bool
    strategy: str
    group: int | None
    block: tuple[int, int] | None
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    """A checkpoint's ``quantization_config``: its format, scheme groups and ignore list."""

    format: str
    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme that quantizes ``module`` (a name or ``re:`` target before a class target), if any."""
        if any(_matches(t, module) for t in self.ignore):
            return None
        named = [s for s in self.schemes if any(_matches(t, module) for t in s.targets if _is_name(t))]
        by_class = [s for s in self.schemes if any(not _is_name(t) for t in s.targets)]
        return (named or by_class or [None])[0]


def _is_name(target: str) -> bool:
    return target.startswith("re:") or "." in target


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def read_config(raw: dict, where: str) -> Config | None:
    """The ``quantization_config`` of a config.json, checked; None when the checkpoint is not quantized.
    Anything herd cannot run is a CheckpointError naming the field."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    field = "quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: {field} is not an object")
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise CheckpointError(f"{where}: {field}.quant_method {method!r} is not supported; herd reads "
                              "'compressed-tensors' checkpoints (FP8, W4A16, W8A16) or full-precision ones")
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: {field}.config_groups is missing or empty")
    schemes = []
    for name, group in groups.items():
        at = f"{field}.config_groups.{name}"
        g_fmt = group.get("format") or fmt
        if g_fmt not in FORMATS:
            raise CheckpointError(f"{where}: {at}.format {g_fmt!r} is not supported (herd reads "
                                  f"{', '.join(FORMATS)})")
        w = group.get("weights")
        if not isinstance(w, dict):
            raise CheckpointError(f"{where}: {at}.weights is missing; herd runs weight-quantized checkpoints")
        bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        if (kind, bits) not in (("int", 4), ("int", 8), ("float", 8)):
            raise CheckpointError(f"{where}: {at}.weights: {kind} {bits}-bit weights are not supported "
                                  "(int 4 or 8 bits, float 8 bits)")
        if strategy not in ("channel", "group", "tensor", "block"):
            raise CheckpointError(f"{where}: {at}.weights.strategy {strategy!r} is not supported "
                                  "(channel, group, tensor or block)")
        if w.get("actorder") == "group":
            raise CheckpointError(f"{where}: {at}.weights.actorder 'group' (a permuted group order) is not supported")
        if w.get("dynamic"):
            raise CheckpointError(f"{where}: {at}.weights.dynamic is true; herd needs stored weight scales")
        group_size = w.get("group_size") if strategy == "group" else None
        if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
            raise CheckpointError(f"{where}: {at}.weights.group_size {group_size!r} must be a positive integer")
        block = tuple(w.get("block_structure") or ()) if strategy == "block" else None
        if strategy == "block" and len(block) != 2:
            raise CheckpointError(f"{where}: {at}.weights.block_structure {block!r} must be [rows, columns]")
        targets = group.get("targets") or []
        if not isinstance(targets, list) or not targets:
            raise CheckpointError(f"{where}: {at}.targets must be a non-empty list")
        schemes.append(Scheme(bits, kind, bool(w.get("symmetric", True)), strategy, group_size, block,
                              tuple(targets)))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list):
        raise CheckpointError(f"{where}: {field}.ignore must be a list of module names")
    return Config(fmt if fmt in FORMATS else "mixed", tuple(schemes), tuple(ignore))


# ---- one quantized matrix ----------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix [N, K] (or a stack [E, N, K]) as a checkpoint stores it: ``data`` (packed int32,
    int8 or float8 values), ``scale`` [.., N, K / group], an integer ``zero`` point like it or
    None; w = (q - zero) * scale. ``kind`` 'int' or 'float', ``bits`` 4 or 8."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: tuple[int, ...]
    group: int
    bits: int
    kind: str

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.zero) if t is not None]

    def __getitem__(self, e: int) -> QuantizedWeight:
        """Expert e of a stack."""
        return replace(self, data=self.data[e], scale=self.scale[e], zero=None if self.zero is None else self.zero[e],
                       shape=self.shape[1:])

    def narrow(self, dim: int, start: int, length: int) -> QuantizedWeight | None:
        """The part ``[start, start + length)`` along ``dim`` of the weight, as stored (a tensor-parallel
        rank's slice, no value rounded again); None where the storage cannot be cut there: inside a
        packed word or a group of the input."""
        dim %= len(self.shape)
        if dim < len(self.shape) - 1:  # experts or output rows: whole rows of every tensor
            cut = lambda t: t.narrow(dim, start, length)  # noqa: E731
            return replace(self, data=cut(self.data), scale=cut(self.scale),
                           zero=None if self.zero is None else cut(self.zero),
                           shape=(*self.shape[:dim], length, *self.shape[dim + 1:]))
        K = self.shape[-1]
        per_word = 32 // self.bits if self.data.dtype == torch.int32 else 1
        if start % per_word or length % per_word:
            return None
        data = self.data.narrow(-1, start // per_word, length // per_word)
        if self.group == K:  # one scale per row: it holds for any part of the row
            scale, zero, group = self.scale, self.zero, length
        elif start % self.group == 0 and length % self.group == 0:
            g0, n = start // self.group, length // self.group
            scale, group = self.scale.narrow(-1, g0, n), self.group
            zero = None if self.zero is None else self.zero.narrow(-1, g0, n)
        else:
            return None
        return replace(self, data=data, scale=scale, zero=zero, shape=(*self.shape[:-1], length), group=group)

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        first = parts[0]
        if any((p.kind, p.bits, p.group, p.shape, p.zero is None) != (first.kind, first.bits, first.group, first.shape,
                                                                         first.zero is None) for p in parts):
            raise CheckpointError("the experts of one layer are quantized differently; herd needs one scheme per stack")
        zero = None if first.zero is None else torch.stack([p.zero for p in parts])
        return replace(first, data=torch.stack([p.data for p in parts]), scale=torch.stack([p.scale for p in parts]),
                       zero=zero, shape=(len(parts), *first.shape))

    def values(self) -> torch.Tensor:
        """q [N, K]: int8 (signed) for integer schemes, float8 for float ones."""
        N, K = self.shape
        if self.data.dtype != torch.int32:
            return self.data
        return unpack(self.data, self.bits, N, K)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype`` (a stack expert by expert: one expert's float32 temporaries at a time)."""
        if len(self.shape) == 3:
            out = torch.empty(self.shape, dtype=dtype)
            for e in range(self.shape[0]):
                out[e] = self[e].dequantize(dtype)
            return out
        N, K = self.shape
        q = self.values().float().view(N, K // self.group, self.group)
        if self.zero is not None:
            q = q - self.zero.float()[..., None]
        return (q * self.scale.float()[..., None]).view(N, K).to(dtype)


def unpack(packed: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """int32 words [rows, cols*bits/32] holding values + 2^(bits-1), low bits first -> int8 [rows, cols]."""
    if sys.byteorder != "little":
        raise CheckpointError("packed compressed-tensors weights are read on little-endian machines only")
    b = packed.contiguous().view(torch.uint8).view(rows, -1)
    if bits == 4:
        b = torch.stack([b & 15, b >> 4], dim=-1).view(rows, -1)
    return (b[:, :cols].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [rows, cols] (cols * bits a multiple of 32) -> int32 words [rows, cols*bits/32]."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.contiguous().view(-1).view(torch.int32).view(u.shape[0], -1)  # flat first: a 1-row view may not


# ---- reading --------------------------------------------------------------------------------------


class CompressedSource(Mapping):
    """A tensor source (herd.checkpoint.load.SafetensorsSource) whose quantized modules read as one
    ``X.weight`` each: a meta tensor of the weight's shape in ``meta()``, a `QuantizedWeight` on
    access. Every scale and zero point is checked against its weight when this is built, before a
    weight is read."""

    def __init__(self, base, config: Config, where: str):
        self.base, self.config, self.mapped = base, config, base.mapped
        meta = base.meta()
        self._modules: dict[str, tuple[Scheme, tuple[int, int]]] = {}
        for key in base.keys():
            module, _, leaf = key.rpartition(".")
            if leaf == "weight_packed" or (leaf == "weight" and meta[key].dtype in (torch.int8, torch.float8_e4m3fn)):
                self._modules[module] = self._check(module, meta, where)
        hidden = {f"{m}.{a}" for m in self._modules for a in _AUX}
        self._keys = [k for k in base.keys() if k not in hidden] + [
            f"{m}.weight" for m in self._modules if f"{m}.weight" not in base.keys()]
        self._meta = {k: meta[k] for k in self._keys if k in meta} | {
            f"{m}.weight": torch.empty(shape, dtype=meta[f"{m}.weight_scale"].dtype, device="meta")
            for m, (_, shape) in self._modules.items()}

    def _check(self, module: str, meta, where: str) -> tuple[Scheme, tuple[int, int]]:
        scheme = self.config.scheme_for(module)
        at = self.base.where(f"{module}.weight_scale")
        if scheme is None:
            raise CheckpointError(f"{where}: module '{module}' is stored quantized but quantization_config "
                                  "ignores it or no config group targets it")
        if f"{module}.weight_scale" not in meta:
            raise CheckpointError(f"{at}: missing tensor '{module}.weight_scale'")
        scale = meta[f"{module}.weight_scale"]
        if not scale.dtype.is_floating_point:
            raise CheckpointError(f"{at}: tensor '{module}.weight_scale' has dtype {scale.dtype}; a scale is floating")
        if f"{module}.weight_packed" in meta:
            packed = meta[f"{module}.weight_packed"]
            if packed.dtype != torch.int32 or packed.dim() != 2 or f"{module}.weight_shape" not in meta:
                raise CheckpointError(f"{at}: '{module}.weight_packed' must be int32 [rows, words] beside a "
                                      f"'{module}.weight_shape'")
            N, K = (int(d) for d in self.base[f"{module}.weight_shape"].tolist())  # 2 integers, not weights
            if packed.shape[0] != N or packed.shape[1] * 32 != K * scheme.bits:
                raise CheckpointError(f"{at}: '{module}.weight_packed' {tuple(packed.shape)} does not hold "
                                      f"{scheme.bits}-bit values of shape [{N}, {K}]")
        else:
            N, K = meta[f"{module}.weight"].shape
        expected = {"channel": (N, 1), "tensor": (1,), "group": (N, K // (scheme.group or 1)),
                    "block": tuple(-(-n // b) for n, b in zip((N, K), scheme.block or (1, 1)))}[scheme.strategy]
        if scheme.strategy == "group" and K % scheme.group:
            raise CheckpointError(f"{at}: '{module}' has {K} inputs, not a multiple of group_size {scheme.group}")
        if scheme.strategy == "block" and (N % scheme.block[0] or K % scheme.block[1]):
            raise CheckpointError(f"{at}: '{module}' [{N}, {K}] is not whole blocks of {list(scheme.block)}")
        allowed = {expected} | ({(), (1, 1)} if scheme.strategy == "tensor" else set())
        if tuple(scale.shape) not in allowed:
            raise CheckpointError(f"{at}: tensor '{module}.weight_scale' has shape {tuple(scale.shape)}; "
                                  f"{scheme.strategy} quantization of [{N}, {K}] needs {expected}")
        if not scheme.symmetric and f"{module}.weight_zero_point" not in meta:
            raise CheckpointError(f"{at}: missing tensor '{module}.weight_zero_point' (the scheme is asymmetric)")
        return scheme, (N, K)

    def quantized(self, key: str) -> bool:
        return key.endswith(".weight") and key[:-7] in self._modules

    def __getitem__(self, key: str):
        if not self.quantized(key):
            return self.base[key]
        module = key[:-7]
        scheme, (N, K) = self._modules[module]
        data = self.base[f"{module}.weight_packed" if f"{module}.weight_packed" in self.base else key]
        scale = self.base[f"{module}.weight_scale"]
        group = {"group": scheme.group, "block": (scheme.block or (0, 0))[1]}.get(scheme.strategy, K)
        if scheme.strategy == "block":
            scale = scale.repeat_interleave(scheme.block[0], dim=0)  # one row of scales per row of weights
        scale = scale.reshape(-1, K // group).expand(N, K // group)
        zero = None
        if f"{module}.weight_zero_point" in self.base:
            zero = self.base[f"{module}.weight_zero_point"]
            if zero.dtype == torch.int32:  # packed down the rows
                zero = unpack(zero.t(), scheme.bits, zero.shape[1], N).t()
            zero = zero.reshape(N, K // group)
        return QuantizedWeight(data, scale, zero, (N, K), group, scheme.bits, scheme.kind)

    def __contains__(self, key) -> bool:  # from the headers, never by reading a tensor
        return key in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self) -> Mapping[str, torch.Tensor]:
        return self._meta

    def where(self, key: str) -> str:
        module = key[:-7] if self.quantized(key) else None
        return self.base.where(f"{module}.weight_scale" if module else key)


# ---- writing --------------------------------------------------------------------------------------


def config_entry(bits: int, group: int | None, symmetric: bool, ignore: list[str], kind: str = "int") -> dict:
    """config.json's ``quantization_config`` for herd's weight-only int4 (groups) or int8 (channels),
    or its FP8 (float8 e4m3 weights per channel, activations per token at run time: FP8-dynamic)."""
    weights = {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": "group" if group else "channel",
               "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    fmt, activations = "pack-quantized", None
    if kind == "float":
        fmt = "float-quantized"
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                       "group_size": None, "actorder": None, "observer": None, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations,
                                          "output_activations": None, "format": fmt}},
            "ignore": ignore, "kv_cache_scheme": None}


def compressed_tensors(module: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bits: int) -> dict[str, torch.Tensor]:
    """The tensors of one quantized Linear: q int8 [N, K], scale [N, K/g], zero int8 like scale or None;
    or q float8 [N, K] with its scale [N, 1] (float-quantized: stored as they are)."""
    if q.dtype.is_floating_point:
        return {f"{module}.weight": q.contiguous(), f"{module}.weight_scale": scale.contiguous()}
    N, K = q.shape
    out = {f"{module}.weight_packed": pack(q, bits), f"{module}.weight_scale": scale.contiguous(),
           f"{module}.weight_shape": torch.tensor([N, K])}
    if zero is not None:
        out[f"{module}.weight_zero_point"] = pack(zero.t(), bits).t().contiguous()  # packed down the rows
    return out
