"""Reading and writing checkpoint folders: build on the meta device, check, stream, assign.

A load never holds two copies of the weights: the model is built on the meta device (no memory),
every tensor is read from a memory-mapped file, converted to the target dtype and device, and
assigned; only then does the caller get a model. Before a byte of weights is read, the conversion
plan is run over *meta* tensors made from the file headers, so a missing, unexpected, misshapen or
non-float tensor is reported (with its file) without any work done and nothing half-loaded.

With ``shard`` (tensor parallelism), the meta model is first made one rank's shard and each tensor is
read narrowed to that rank's part: a part of a memory-mapped view copies only its own bytes out of
the file (see `_read`).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from herd.checkpoint import compressed, hf, meta
from herd.checkpoint.errors import CheckpointError
from herd.config import ConfigError, ModelConfig, from_hf_config, from_meta_params, to_hf_config
from herd.kernels import quant
from herd.model.transformer import TextModel
from herd.model.vision import VisionModel

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HF_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Memory-mapped files: tensors are views of the page cache; once copied, their pages are dropped.

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_CHUNK_BYTES = 64 << 20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


class MappedFiles:
    """The address ranges of read-only file mappings, so consumed pages can leave our resident set.

    A page of a mapped file that has been read counts in the process's resident memory until it is
    unmapped. Loading copies each tensor out and then drops its pages (madvise DONTNEED: the file is
    untouched and a later read maps them again), so resident memory peaks at the model plus about
    one tensor, not the model plus the checkpoint. On other platforms the drop is skipped.
    """

    _advise = _madvise()

    def __init__(self):
        self._ranges: list[tuple[int, int]] = []

    def add(self, start: int, nbytes: int) -> None:
        self._ranges.append((start, start + nbytes))

    def _span(self, t: torch.Tensor) -> tuple[int, int] | None:
        """The address range of a tensor's bytes, if it lies in one of our mappings (a view of a file)."""
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        lo = t.data_ptr()
        hi = lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
        return (lo, hi) if any(a <= lo and hi <= b for a, b in self._ranges) else None

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of mapped file bytes (not a copy, e.g. one joined from slices)."""
        return isinstance(t, torch.Tensor) and self._span(t) is not None

    def drop(self, t: torch.Tensor) -> None:
        """Drop the whole pages spanned by a tensor's bytes, if they lie in one of our mappings."""
        span = None if self._advise is None else self._span(t)
        if span is None:
            return  # not file-backed (e.g. a tensor joined from model-parallel slices)
        lo, hi = -(-span[0] // _PAGE) * _PAGE, span[1] // _PAGE * _PAGE
        if hi > lo:
            self._advise(lo, hi - lo, _MADV_DONTNEED)

    def copy(self, t: torch.Tensor, dtype: torch.dtype, device: str | torch.device,
             column_major: bool = False) -> torch.Tensor:
        """A new tensor (own memory, given dtype and device) equal to ``t``, copied piece by piece with
        each piece's source pages dropped as the copy goes: a conversion never holds a second full copy.
        ``column_major`` (a matrix): the result has strides (1, rows), see herd.kernels.cpu.head_column_major."""
        if column_major:
            out = torch.empty_strided(t.shape, (1, t.shape[0]), dtype=dtype, device=device)
            step = max(1, _CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
            pieces = ((out[a:a + step], t[a:a + step]) for a in range(0, t.shape[0], step))
            for dst_piece, src_piece in pieces:
                dst_piece.copy_(src_piece)
                self.drop(src_piece)
            return out
        out = torch.empty(t.shape, dtype=dtype, device=device)
        if t.is_contiguous():  # flat chunks
            src, dst = t.reshape(-1), out.view(-1)
            step = max(1, _CHUNK_BYTES // t.element_size())
            pieces = ((dst[a:a + step], src[a:a + step]) for a in range(0, src.numel(), step))
        elif t.dim() > 1:  # a strided view (half of a fused tensor, a transpose): one slice of dim 0 at a time
            pieces = zip(out, t)
        else:
            pieces = [(out, t)]
        for dst_piece, src_piece in pieces:
            dst_piece.copy_(src_piece)
            self.drop(src_piece)
        return out


def _map_file(path: Path, nbytes: int, mapped: MappedFiles) -> torch.Tensor:
    """The whole file as a read-only-in-spirit uint8 tensor (private mapping: writes never reach the file)."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
    mapped.add(storage.data_ptr(), nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


# ---------------------------------------------------------------------------------------------
# Tensor sources: lazy mappings from checkpoint key to tensor, plus their meta (header-only) view.


def _safetensors_header(path: Path) -> tuple[dict, int, int]:
    """(tensor entries, offset of the data area, file size) of a safetensors file, checked for consistency."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(n) if 2 <= n <= min(size - 8, 100 << 20) else None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if raw is None:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} in a {size}-byte file)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = _ST_DTYPES.get(info["dtype"]), [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{key}' has a malformed header entry {info!r}") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{key}' has unsupported dtype {info['dtype']}")
        need = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b and b - a == need):
            raise CheckpointError(f"{path}: tensor '{key}' has data offsets {[a, b]} that do not hold "
                                  f"{info['dtype']} {shape} ({need} bytes)")
        if data_start + b > size:
            raise CheckpointError(f"{path}: tensor '{key}' ends at byte {data_start + b} but the file has {size} "
                                  f"bytes (truncated file?)")
        info["dtype"], info["shape"] = dtype, shape
    return header, data_start, size


class SafetensorsSource(Mapping):
    """Every tensor of a Hugging Face folder (one file or shards with an index), memory-mapped."""

    def __init__(self, folder: Path):
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = {f: folder / f for f in set(weight_map.values())}
            for f in sorted(files):
                if not files[f].exists():
                    raise CheckpointError(f"{index}: shard file '{f}' listed in the index is missing")
        elif single.exists():
            files, weight_map = {single.name: single}, None
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        # Where a tensor that is not there should have been: the one file, or the index.
        self._expected_in = index if index.exists() else single
        self.mapped = MappedFiles()
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        self._files: dict[Path, torch.Tensor | int] = {}
        self._meta = {}
        for name, path in sorted(files.items()):
            header, data_start, size = _safetensors_header(path)
            self._files[path] = size  # mapped on first read
            for key, info in header.items():
                if weight_map is not None and weight_map.get(key) != name:
                    raise CheckpointError(f"{path}: tensor '{key}' is not listed for this file in the index")
                self._entries[key] = (path, info, data_start)
                self._meta[key] = torch.empty(info["shape"], dtype=info["dtype"], device="meta")
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._entries))
            if absent:
                raise CheckpointError(f"{folder / weight_map[absent[0]]}: tensor '{absent[0]}' listed in the "
                                      f"index is not in the file")

    def __getitem__(self, key: str) -> torch.Tensor:
        path, info, data_start = self._entries[key]
        data = self._files[path]
        if isinstance(data, int):
            data = self._files[path] = _map_file(path, data, self.mapped)
        a, b = info["data_offsets"]
        raw = data[data_start + a:data_start + b]
        if (data_start + a) % info["dtype"].itemsize:  # unaligned (legal, rare): copy before reinterpreting
            raw = raw.clone()
        return raw.view(info["dtype"]).reshape(info["shape"])

    def __contains__(self, key) -> bool:  # Mapping's own would map the tensor to find out
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self) -> Mapping[str, torch.Tensor]:
        return self._meta

    def where(self, key: str) -> str:
        return str(self._entries[key][0] if key in self._entries else self._expected_in)


def _fp8_shards(folder: Path, paths: list[Path], shards: list, dtype: torch.dtype,
                release: Callable[[torch.Tensor], None] = lambda t: None) -> list[meta.Fp8Shard]:
    """Meta's FP8 release: each consolidated.NN.pth beside its fp8_scales_N.pt, read dequantized."""
    if any(folder.glob("int4_scales_*.pt")):
        raise CheckpointError(f"{folder}: int4_scales_*.pt (Meta's int4_mixed layout) is not supported; load the "
                              "bf16 or FP8 release, with quantize='int4' to hold it in int4")
    out = []
    for i, (path, shard) in enumerate(zip(paths, shards)):
        scales_path = folder / f"fp8_scales_{i}.pt"
        try:
            scales = torch.load(str(scales_path), map_location="cpu", weights_only=True)
        except Exception as e:  # a missing file, or damaged zip/pickle data
            raise CheckpointError(f"{scales_path}: cannot read Meta's FP8 scales beside {path.name} ({e})") from None
        if not isinstance(scales, Mapping) or not all(isinstance(v, torch.Tensor) for v in scales.values()):
            raise CheckpointError(f"{scales_path}: expected a dict of tensors (scales by name)")
        out.append(meta.Fp8Shard(shard, scales, dtype, str(path), str(scales_path), release))
    return out


class MetaSource(Mapping):
    """Meta's consolidated.NN.pth model-parallel shards, memory-mapped and merged per tensor."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        paths = sorted(folder.glob("consolidated.*.pth"))
        if not paths:
            raise CheckpointError(f"{folder}: params.json but no consolidated.NN.pth shard")
        numbers = [p.name.split(".")[1] for p in paths]
        expected = [f"{i:02d}" for i in range(len(paths))]
        if all(n.isdigit() for n in numbers):  # a gap: name the files that are missing
            missing = [f"consolidated.{i:02d}.pth" for i in range(max(map(int, numbers)) + 1)
                       if f"{i:02d}" not in numbers]
            if missing:
                raise CheckpointError(f"{folder}: {', '.join(missing)} missing (found "
                                      f"{', '.join(p.name for p in paths)})")
        if numbers != expected:
            raise CheckpointError(f"{folder}: shards {[p.name for p in paths]} are not consolidated.00.pth "
                                  f".. consolidated.{len(paths) - 1:02d}.pth")
        self.mapped = MappedFiles()
        shards = []
        for p in paths:
            try:
                shard = torch.load(str(p), map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for damaged zip/pickle data
                raise CheckpointError(f"{p}: not a readable torch checkpoint ({e})") from None
            if not isinstance(shard, Mapping) or not all(isinstance(v, torch.Tensor) for v in shard.values()):
                raise CheckpointError(f"{p}: expected a dict of tensors (a state dict)")
            storages = [v.untyped_storage() for v in shard.values() if v.untyped_storage().nbytes()]
            if storages:
                lo = min(s.data_ptr() for s in storages)
                self.mapped.add(lo, max(s.data_ptr() + s.nbytes() for s in storages) - lo)
            shards.append(shard)
        self._paths = paths
        names = [str(p) for p in paths]
        metas = [{k: torch.empty_like(v, device="meta") for k, v in s.items()} for s in shards]
        if (folder / "fp8_scales_0.pt").exists() or any(folder.glob("int4_scales_*.pt")):
            shards = _fp8_shards(folder, paths, shards, dtype, self.mapped.drop)
            metas = _fp8_shards(folder, paths, metas, dtype)
        self._merged = meta.MetaShards(shards, names, release=self.mapped.drop)
        self._meta = meta.MetaShards(metas, names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._merged[key]

    def read_view(self, key: str, view: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(``view(self[key])``, bytes read), reading only what the view covers (`meta.MetaShards.read_view`)."""
        return self._merged.read_view(key, view)

    def __iter__(self) -> Iterator[str]:
        return iter(self._merged)

    def __len__(self) -> int:
        return len(self._merged)

    def meta(self) -> Mapping[str, torch.Tensor]:
        return self._meta

    def where(self, key: str) -> str:
        return str(self._paths[0]) if len(self._paths) == 1 else f"{self._paths[0].parent}/consolidated.*.pth"


# ---------------------------------------------------------------------------------------------
# Folders


def read_config(folder: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(config, 'hf' | 'meta') of a checkpoint folder; CheckpointError when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (and not a preset name)")
    if (folder / "config.json").exists():
        path, fmt = folder / "config.json", "hf"
        raw = _read_json(path)
        kind = raw.get("model_type")
        if kind not in ("llama4", "llama4_text"):
            raise CheckpointError(f"{path}: model_type '{kind}' is not a Llama 4 model ('llama4' or 'llama4_text')")
        build = from_hf_config
    elif (folder / "params.json").exists():
        path, fmt, build = folder / "params.json", "meta", from_meta_params
        raw = _read_json(path)
    else:
        raise CheckpointError(f"{folder}: not a checkpoint folder (no config.json or params.json)")
    try:
        return build(raw, where=str(path)), fmt
    except ConfigError as e:
        message = str(e)
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed config ({type(e).__name__}: {e})") from None


def quantization(folder: str | os.PathLike) -> compressed.Config | None:
    """The quantization of a Hugging Face folder's weights (its config.json's ``quantization_config``,
    checked), or None: full precision, or a Meta folder."""
    path = Path(folder) / "config.json"
    return compressed.read_config(_read_json(path), str(path)) if path.exists() else None


def _plan_and_source(folder: Path, cfg: ModelConfig, fmt: str, vision: bool, dtype: torch.dtype = torch.float32):
    """(herd key -> Recipe, tensor source, keys to ignore) for the text model and, if wanted, the vision part."""
    if fmt == "hf":
        source = SafetensorsSource(folder)
        quantized = quantization(folder)
        if quantized is not None:
            source = compressed.CompressedSource(source, quantized, str(folder / "config.json"))
        try:
            layout = hf.detect_layout(source.keys())
        except KeyError as e:
            raise CheckpointError(f"{folder}: {e.args[0]}") from None
        plan = hf.hf_plan(cfg.text, layout, hf.per_expert(source.keys(), layout))
        if vision:
            plan |= hf.hf_vision_plan(cfg.vision)
            return plan, source, lambda k: False
        return plan, source, lambda k: k.startswith(_HF_VISION_PREFIXES)
    source = MetaSource(folder, dtype)
    plan = meta.meta_plan(cfg.text, set(source.keys()))
    if vision:
        return plan | meta.meta_vision_plan(cfg.vision), source, lambda k: meta.skipped(k) and not meta.is_vision_key(k)
    return plan, source, meta.skipped


def _stored(plan: dict[str, hf.Recipe], source) -> set[str]:
    """herd tensor names whose weights the checkpoint stores quantized."""
    quantized = getattr(source, "quantized", lambda key: False)
    return {k for k, r in plan.items() if any(quantized(s) for s in r.sources)}


def stored_quantized(folder: str | os.PathLike, cfg: ModelConfig) -> set[str]:
    """`_stored` of a Hugging Face folder, from the file headers alone."""
    plan, source, _ = _plan_and_source(Path(folder), cfg, "hf", vision=False)
    return _stored(plan, source)


def check_plan(plan: dict[str, hf.Recipe], source, expected: Mapping[str, torch.Tensor],
               ignore: Callable[[str], bool]) -> int:
    """Validate names, shapes and dtypes on meta tensors; return the bytes the source will supply."""
    needed = {s for r in plan.values() for s in r.sources}
    missing = sorted(needed - set(source.keys()))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source.where(missing[0])}: missing tensor '{missing[0]}'{more}")
    unexpected = sorted(k for k in source.keys() if k not in needed and not ignore(k))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source.where(unexpected[0])}: unexpected tensor '{unexpected[0]}'{more} "
                              f"for this config")
    shapes = source.meta()
    for key, t in hf.run_plan(plan, shapes):
        src = plan[key].sources[0]
        if t.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(f"{source.where(src)}: tensor '{src}' has dtype {t.dtype}; expected a "
                                  f"floating weight (float32, bfloat16 or float16)")
        if t.shape != expected[key].shape:
            raise CheckpointError(f"{source.where(src)}: tensor '{src}' gives shape {tuple(t.shape)} for "
                                  f"{key}; the config expects {tuple(expected[key].shape)}"
                                  + _counts_at_fault(key, tuple(t.shape), tuple(expected[key].shape)))
    return sum(shapes[s].numel() * shapes[s].element_size() for s in needed)


# Tensors whose first dimension is a count the config states: say the two counts in its words.
_COUNTED = (("feed_forward.router.weight", "experts", "router has {} rows"),
            ("feed_forward.experts.", "experts", "expert stack holds {}"),
            ("tok_embeddings.weight", "vocab_size", "embedding has {} rows"),
            ("output.weight", "vocab_size", "output head has {} rows"))


def _counts_at_fault(key: str, got: tuple, want: tuple) -> str:
    for part, what, file_says in _COUNTED:
        if part in key and got and want and got[0] != want[0]:
            return f" (config: {want[0]} {what}; the file's {file_says.format(got[0])})"
    return ""


class _Progress:
    """One stderr line, rewritten in place on a terminal, every ~10% otherwise."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.done, self.enabled = label, max(total, 1), 0, enabled
        self.tty, self.last = sys.stderr.isatty(), -1

    def add(self, n: int):
        if not self.enabled:
            return
        self.done += n
        pct = int(100 * self.done / self.total)
        if (self.tty and pct != self.last) or pct // 10 != self.last // 10 or self.done >= self.total:
            end = "\r" if self.tty and self.done < self.total else "\n"
            print(f"{self.label}: {pct:3d}% ({self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB)", end=end,
                  file=sys.stderr, flush=True)
            self.last = pct


# Bytes each herd tensor took out of the checkpoint, by herd key: a part read from a file view counts its
# own bytes, a tensor the source had to build whole (a join of Meta's model-parallel slices, a
# dequantization) counts all of its sources. Tests check that a rank read only its slices.
READ_BYTES: Counter[str] = Counter()


def _nbytes(t) -> int:
    tensors = t.tensors() if isinstance(t, compressed.QuantizedWeight) else [t]
    return sum(x.numel() * x.element_size() for x in tensors)


def _read(recipe: hf.Recipe, source, part, dtype: torch.dtype):
    """(value, bytes read, source tensors to let go) of one herd tensor, or of ``part`` (dim, start,
    length, size) of it.

    A part is taken before anything is copied where the layout allows: experts stored one by one stack
    only the part of each (or, split by expert, only their own experts); a recipe that is a view of
    the file (a rename, a transpose, half of a fused tensor) is narrowed as a view, so the copy reads
    only the part's bytes; Meta's model-parallel slices are cut to the part before they are joined.
    Otherwise (a tensor the source builds whole) it is read, then narrowed: at most one whole tensor
    at a time."""
    if part is not None and hasattr(source, "read_view") and recipe.combine is not hf.stack_experts:
        (key,) = recipe.sources
        value, nbytes = source.read_view(key, lambda t: recipe.combine(t).narrow(part[0], part[1], part[2]))
        return value, nbytes, []
    sources = [source[s] for s in recipe.sources]
    return (*_combine(recipe, sources, part, source.mapped, dtype), sources)


def _combine(recipe: hf.Recipe, sources: list, part, mapped: MappedFiles, dtype: torch.dtype):
    """(value, bytes read) of `_read` from the source tensors themselves."""
    if part is None:
        value = recipe.combine(*sources)  # a view of the file counts its own bytes (half of a fused tensor)
        return value, _nbytes(value) if mapped.holds(value) else sum(_nbytes(t) for t in sources)
    dim, start, length = part[0], part[1], part[2]
    if recipe.combine is hf.stack_experts:
        cut = sources[start:start + length] if dim == 0 else [t.narrow(dim - 1, start, length) for t in sources]
        if all(t is not None for t in cut):  # whole experts, or the part of each
            return recipe.combine(*cut), sum(_nbytes(t) for t in cut)
    value = recipe.combine(*sources)
    if isinstance(value, compressed.QuantizedWeight):
        cut = value.narrow(dim, start, length)  # stored values as they are: no second rounding
        if cut is not None:
            return cut, _nbytes(cut)
        value = value.dequantize(dtype)
    if mapped.holds(value):
        value = value.narrow(dim, start, length)
        return value, _nbytes(value)
    return value.narrow(dim, start, length), sum(_nbytes(t) for t in sources)


def _pad(t: torch.Tensor, part) -> torch.Tensor:
    """A part shorter than its ``size`` (the output head's last) with zeros after it."""
    dim, length, size = part[0], part[2], part[3]
    if length == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - length
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def load_model(folder: str | os.PathLike, cfg: ModelConfig | None = None, fmt: str | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress: bool = True,
               vision: bool = True, column_major: Collection[str] = (),
               quantize: Callable[[TextModel, set[str], Mapping], Mapping[str, Callable]] | None = None,
               shard: Callable[[TextModel], Mapping[str, tuple[int, int, int, int]]] | None = None,
               ) -> tuple[TextModel, VisionModel | None]:
    """Stream a checkpoint into a TextModel (and a VisionModel when the config has one and ``vision``)
    built on the meta device; every name, shape and dtype is checked before any weight is read.
    ``column_major``: names of matrices to store with strides (1, rows) (a kernel's layout).
    ``quantize(model, stored, parts)``: installs quantized modules into the meta model (already
    sharded to ``parts``) and returns tensor name -> `herd.kernels.quant.Quantizer` turning that weight
    into the quantized modules' state; ``stored`` names the tensors the checkpoint holds quantized.
    Each weight is quantized as it streams in, so the unquantized model never exists whole. A
    quantized weight no quantizer takes is dequantized."""
    folder = Path(folder)
    if cfg is None or fmt is None:
        cfg, fmt = read_config(folder)
    vision = vision and cfg.vision is not None
    with torch.device("meta"):
        text = TextModel(cfg.text)
        encoder = VisionModel(cfg.vision, cfg.text.dim) if vision else None
    expected = dict(text.state_dict())  # full shapes: what the checkpoint must hold
    keep = shard(text) if shard is not None else {}
    held = set(text.state_dict()) | {"vision." + k for k in (encoder.state_dict() if encoder is not None else ())}
    if encoder is not None:
        expected |= {"vision." + k: v for k, v in encoder.state_dict().items()}
    plan, source, ignore = _plan_and_source(folder, cfg, fmt, vision, dtype)
    total = check_plan(plan, source, expected, ignore)
    quantizers = quantize(text, _stored(plan, source), keep) if quantize is not None else {}
    bar = _Progress(f"loading {folder.name}", total, progress)
    state, counted = {}, set()  # a fused source tensor feeds several keys: count its bytes once

    def advance(recipe: hf.Recipe) -> None:
        bar.add(sum(source.meta()[s].numel() * source.meta()[s].element_size() for s in recipe.sources
                    if s not in counted))
        counted.update(recipe.sources)

    for key, recipe in plan.items():
        if key not in held:  # another pipeline stage's layer: `shard` left it out of this model
            advance(recipe)
            continue
        # A copy in the model's own memory (never a view of the file), then the file pages are let go.
        q = quantizers.get(key)
        part = None if q is not None and q.cut is not None else keep.get(key)  # cut: read whole, cut once quantized
        value, nbytes, parts = _read(recipe, source, part, dtype)
        READ_BYTES[key] += nbytes
        if q is not None:
            if part is not None and part[2] != part[3]:  # the head's last part: its zero rows quantized too
                value = _pad(value.dequantize(dtype) if isinstance(value, compressed.QuantizedWeight) else value, part)
            state |= q(value, source.mapped.drop)  # file pages let go expert by expert
        elif isinstance(value, compressed.QuantizedWeight):
            state[key] = value.dequantize(dtype).to(device)
        else:
            state[key] = source.mapped.copy(value, dtype, device, column_major=key in column_major and key not in keep)
        if key in keep and key in state:
            state[key] = _pad(state[key], keep[key])
        for part in parts:
            for t in part.tensors() if isinstance(part, compressed.QuantizedWeight) else [part]:
                source.mapped.drop(t)
        advance(recipe)
    text.load_state_dict({k: v for k, v in state.items() if not k.startswith("vision.")}, strict=True, assign=True)
    if encoder is not None:
        encoder.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("vision.")}, strict=True,
                                assign=True)
        encoder = encoder.eval().requires_grad_(False)
    return text.eval().requires_grad_(False), encoder


def _compressed(tensors: dict, example: compressed.QuantizedWeight, vision: bool) -> tuple[dict, dict]:
    """Hugging Face tensors with every quantized weight in the compressed-tensors layout, and the
    ``quantization_config`` that says so: the quantized Linears of herd's one scheme, every other
    Linear in ``ignore``."""
    out, ignore = {}, []
    for key, t in tensors.items():
        if isinstance(t, compressed.QuantizedWeight):
            out |= compressed.compressed_tensors(key[:-7], t.values(), t.scale, t.zero, t.bits)
            continue
        out[key] = t
        if key.endswith(".weight") and t.dim() == 2 and "embed_tokens" not in key and not key.startswith(
                _HF_VISION_PREFIXES):
            ignore.append(key[:-7])
    if vision:
        ignore += ["re:vision_model.*", "re:multi_modal_projector.*"]
    group = example.group if example.bits == 4 else None
    return out, compressed.config_entry(example.bits, group, symmetric=example.zero is None, ignore=ignore,
                                        kind=example.kind)


def check_new_folder(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path, if a checkpoint may be written there (absent, or an empty folder)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckpointError(f"{folder}: exists and is not an empty folder; refusing to overwrite")
    return folder


def save_hf(model: TextModel, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 << 30, extra_files: Mapping[str, Path] | None = None,
            vision: VisionModel | None = None, special_tokens: Mapping[str, int] | None = None) -> Path:
    """Write a Hugging Face folder (config.json, safetensors shards + index): Llama4ForCausalLM, or
    Llama4ForConditionalGeneration when a vision model is given.

    ``special_tokens``: the tokenizer's name -> id table, for the token ids config.json names
    (default: Llama 4's layout at the end of the vocabulary).
    Written into a temporary sibling folder and renamed at the end, so an interrupted save never
    leaves a half-written checkpoint under ``folder``.
    """
    folder = check_new_folder(folder)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = quant.plain_state(model)
    quantized = {k: v for k, v in state.items() if isinstance(v, compressed.QuantizedWeight)}
    layout = "causal" if vision is None else "multimodal"
    tensors = hf.to_hf(state, cfg, layout, experts_one_by_one=bool(quantized))
    if vision is not None:
        theirs = {"vision." + k: v for k, v in vision.state_dict().items()}
        tensors |= dict(hf.run_plan(hf.to_hf_vision_plan(vision.cfg), theirs))
    quantization_config = None
    if quantized:
        tensors, quantization_config = _compressed(tensors, next(iter(quantized.values())), vision is not None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        t = (t if dtype is None or not t.is_floating_point() or key.endswith("_scale") or t.element_size() == 1
             else t.to(dtype)).contiguous()  # float8 weights stay as they are
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    torch_dtype = str(dtype or model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config = to_hf_config(cfg, None if vision is None else vision.cfg, special_tokens, torch_dtype)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name, src in (extra_files or {}).items():
        (tmp / name).write_bytes(Path(src).read_bytes())
    if folder.exists():
        folder.rmdir()
    tmp.rename(folder)
    return folder
