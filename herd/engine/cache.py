"""A KV cache that knows Llama 4's layer kinds.

A RoPE layer with chunked attention never looks back past the start of the current chunk, so its
cache holds one chunk (C entries): position p lives in slot p % C, and a new chunk simply
overwrites the previous one (queries only ever read slots up to their own). A NoPE layer (global
attention) keeps the whole context. For Scout (C = 8192, 1 NoPE layer in 4) a 1M-token context
needs 12 full-length layers instead of 48.

All buffers are allocated once, for ``rows`` sequences of up to ``max_len`` tokens; each row
advances independently (rows join and leave between decode steps).

The entries are kept in a float dtype (attention runs in it), or as int8 (``torch.int8``): one
int8 per value plus one scale per (row, KV head, token), read back in a float dtype. That halves
a bf16 cache, and so the NoPE layers' entries, which are what grows with the context.

Legend: R rows, G KV heads, S slots (a layer's capacity), Dh head dim, B rows of a step, T new
tokens per row, L entries read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from herd.config import TextConfig
from herd.model.attention import CacheSlots

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# An int8 cache's scales are float32: a bf16 scale's own rounding (up to 0.4%) would equal int8's,
# and at Dh = 128 four bytes per 128 values add 3% to the cache.
SCALE_DTYPE = torch.float32


def resolve_kv_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The cache's torch dtype from a name ('float32', 'bfloat16' or 'bf16', 'float16', 'int8') or a
    torch dtype; a ValueError naming the allowed values otherwise."""
    if isinstance(dtype, torch.dtype) and dtype in KV_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and _ALIASES.get(dtype, dtype) in KV_DTYPES:
        return KV_DTYPES[_ALIASES.get(dtype, dtype)]
    raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (a name or a torch dtype); got {dtype!r}")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] -> int8 values [..., Dh] and float32 scales [...]: symmetric, scale = absmax / 127
    per vector, so |x - values * scale| <= scale / 2."""
    x = x.float()
    # An all-zero vector gets the smallest normal scale (values 0), never a division by zero.
    scale = (x.abs().amax(-1) / 127).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 values [..., Dh] and their scales [...] -> [..., Dh] in ``dtype`` (rounded once, from float32)."""
    return (values.float() * scales[..., None]).to(dtype)


class Entries:
    """One layer's keys (or values), [R, G, S, Dh] in ``dtype``; the `herd.model.attention.CacheEntries`
    the model writes and reads."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, at: CacheSlots, x_BTGD: torch.Tensor) -> None:
        # An (R, S, G, Dh) view of the buffer: one index_put writes every new token of every row.
        self.data.transpose(1, 2).index_put_((at.row_ids, at.slots), x_BTGD)

    def read(self, at: CacheSlots) -> torch.Tensor:
        return self.data[at.rows, :, :at.length]  # (B, G, L, Dh), a view

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Row ``src``'s first ``n`` entries (or all it holds) into row ``dst``."""
        n = min(n, self.data.shape[2])
        self.data[dst, :, :n] = self.data[src, :, :n]

    def save(self, row: int, n: int, block: int, reuse: list[list[torch.Tensor]] = ()) -> list[list[torch.Tensor]]:
        """Row ``row``'s first ``n`` slots as blocks of ``block`` slots, each a list of copies (values,
        and scales where there are); the first ``len(reuse)`` blocks are ``reuse``'s (another
        snapshot's blocks holding the same entries), not copied."""
        return [reuse[j] if j < len(reuse) else [t[row, :, a:min(a + block, n)].clone() for t in self._tensors()]
                for j, a in enumerate(range(0, n, block))]

    def load(self, row: int, blocks: list[list[torch.Tensor]], n: int) -> None:
        """The first ``n`` slots of `save`'s blocks into row ``row``."""
        a = 0
        for parts in blocks:
            if a >= n:
                break
            b = min(a + parts[0].shape[1], n)
            for t, part in zip(self._tensors(), parts):
                t[row, :, a:b] = part[:, :b - a]
            a = b

    def _tensors(self) -> list[torch.Tensor]:
        return [self.data]


class Int8Entries(Entries):
    """Entries as int8 values [R, G, S, Dh] with a float32 scale per (row, KV head, slot) [R, G, S];
    `read` returns them dequantized to ``dtype``, the dtype attention runs in."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        self.data = torch.zeros(shape, dtype=torch.int8, device=device)
        self.scales = torch.zeros(shape[:3], dtype=SCALE_DTYPE, device=device)
        self.read_dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.read_dtype

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.scales.numel() * self.scales.element_size()

    def write(self, at: CacheSlots, x_BTGD: torch.Tensor) -> None:
        values, scales = quantize_int8(x_BTGD)  # (B, T, G, Dh), (B, T, G)
        self.data.transpose(1, 2).index_put_((at.row_ids, at.slots), values)
        self.scales.transpose(1, 2).index_put_((at.row_ids, at.slots), scales)

    def read(self, at: CacheSlots) -> torch.Tensor:
        # The reference path: a dequantized copy of what this layer reads (one layer at a time, so the
        # extra memory is one layer's K or V for the step, not the cache's).
        return dequantize_int8(self.data[at.rows, :, :at.length], self.scales[at.rows, :, :at.length], self.read_dtype)

    def _tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scales]

    def copy_row(self, src: int, dst: int, n: int) -> None:
        super().copy_row(src, dst, n)
        n = min(n, self.scales.shape[2])
        self.scales[dst, :, :n] = self.scales[src, :, :n]


def layer_capacity(cfg: TextConfig, layer: int, max_len: int) -> int:
    """Entries layer ``layer`` keeps for a context of max_len tokens."""
    chunk = cfg.attention_chunk_size
    if cfg.uses_rope[layer] and chunk is not None:
        return min(chunk, max_len)
    return max_len


def entry_bytes(cfg: TextConfig, dtype: str | torch.dtype = torch.bfloat16) -> int:
    """Bytes of one token's K and V in one layer: the values, and for int8 the scales."""
    dtype = resolve_kv_dtype(dtype)
    per_head = cfg.head_dim * dtype.itemsize + (SCALE_DTYPE.itemsize if dtype == torch.int8 else 0)
    return 2 * cfg.n_kv_heads * per_head


def kv_cache_bytes(cfg: TextConfig, context_len: int, batch: int = 1,
                   dtype: str | torch.dtype = torch.bfloat16) -> int:
    """Bytes of K and V for ``batch`` sequences of ``context_len`` tokens, as this cache allocates them."""
    return batch * entry_bytes(cfg, dtype) * sum(layer_capacity(cfg, i, context_len) for i in range(cfg.n_layers))


def full_cache_bytes(cfg: TextConfig, context_len: int, batch: int = 1,
                     dtype: str | torch.dtype = torch.bfloat16) -> int:
    """Bytes of a cache that keeps every layer's entries for the whole context (the usual design)."""
    return batch * entry_bytes(cfg, dtype) * cfg.n_layers * context_len


# Positions per block of a snapshot: snapshots of prompts sharing a prefix share its whole blocks.
SNAPSHOT_BLOCK = 256


@dataclass
class Snapshot:
    """A row's cache entries for its first ``n`` positions: per layer (K blocks, V blocks), each block
    a list of tensors; blocks may be shared with other snapshots (`KVCache.snapshot`'s ``shared``)."""

    n: int
    parts: list[tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]]

    def tensors(self) -> list[torch.Tensor]:
        return [t for k, v in self.parts for blocks in (k, v) for block in blocks for t in block]

    @property
    def nbytes(self) -> int:
        """Bytes of every block, shared ones included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVCache:
    """Per layer K and V entries [rows, G, capacity, Dh]; ``lengths[r]`` = tokens of row r seen so far.

    ``dtype``: the entries' dtype (a name or torch dtype, see `KV_DTYPES`); for int8, ``read_dtype``
    is the float dtype they are read back in (default float32). ``kv_heads``: KV heads per row (default
    the config's; a tensor-parallel rank keeps only its own). ``layers``: the layers it holds, in order
    (default all; a pipeline stage holds its own).
    """

    def __init__(self, cfg: TextConfig, rows: int, max_len: int, dtype: str | torch.dtype,
                 device: torch.device | str, read_dtype: torch.dtype | None = None, kv_heads: int | None = None,
                 layers: range | None = None):
        self.cfg, self.rows, self.max_len = cfg, rows, max_len
        self.layers = layers if layers is not None else range(cfg.n_layers)
        self.dtype = resolve_kv_dtype(dtype)
        if self.dtype == torch.int8:
            read = resolve_kv_dtype(read_dtype or torch.float32)
            if read == torch.int8:
                raise ValueError("an int8 cache is read back in a float dtype (float32, bfloat16, float16), not int8")
            make = lambda shape: Int8Entries(shape, read, device)  # noqa: E731
        else:
            make = lambda shape: Entries(shape, self.dtype, device)  # noqa: E731
        G = kv_heads or cfg.n_kv_heads
        shape = lambda i: (rows, G, layer_capacity(cfg, i, max_len), cfg.head_dim)  # noqa: E731
        self.k = [make(shape(i)) for i in self.layers]
        self.v = [make(shape(i)) for i in self.layers]
        self.lengths = [0] * rows

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated (K and V, all layers and rows, scales included)."""
        return sum(e.nbytes for e in self.k + self.v)

    def reset(self, row: int) -> None:
        """Forget row ``row`` (its slots are overwritten by the next sequence; nothing to clear)."""
        self.lengths[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Move a sequence from row ``src`` to row ``dst`` (its filled entries only)."""
        n = self.lengths[src]
        for e in self.k + self.v:
            e.copy_row(src, dst, n)
        self.lengths[dst], self.lengths[src] = n, 0

    def _held(self, layer: int, n: int) -> int:
        """Slots layer ``layer`` holds for the first ``n`` positions: all of them in a global layer;
        in a chunked one, those of the chunk position n falls in (none at a chunk's start)."""
        C = self.cfg.attention_chunk_size
        return n - n // C * C if self.cfg.uses_rope[layer] and C is not None else n

    def snapshot_bytes(self, n: int) -> int:
        """The bytes `snapshot` takes for ``n`` positions (of any row)."""
        per_slot = sum(t[0, :, 0].numel() * t.element_size() for e in (self.k[0], self.v[0]) for t in e._tensors())
        return per_slot * sum(self._held(i, n) for i in self.layers)

    def _block(self) -> int:
        C = self.cfg.attention_chunk_size
        return SNAPSHOT_BLOCK if C is None else math.gcd(SNAPSHOT_BLOCK, C)  # blocks never straddle a chunk

    def snapshot(self, row: int, n: int, shared: tuple[Snapshot, int] | None = None) -> Snapshot:
        """Copies of what row ``row`` holds for its first ``n`` positions (prefix caching), in blocks.
        ``shared`` (snapshot, s): another snapshot whose first ``s`` positions are the same tokens (and
        images): its whole blocks within them are taken as they are, not copied."""
        B = self._block()
        parts = []
        for j, (i, k, v) in enumerate(zip(self.layers, self.k, self.v)):
            held, reuse = self._held(i, n), 0
            if shared is not None:
                other, s = shared
                start = n - held  # the held slots' first position: 0, or the chunk's start
                if start == other.n - self._held(i, other.n):  # the same chunk (or a global layer)
                    reuse = max(0, min(s, n, other.n) - start) // B
            k_blocks, v_blocks = shared[0].parts[j] if reuse else ((), ())
            parts.append((k.save(row, held, B, k_blocks[:reuse]), v.save(row, held, B, v_blocks[:reuse])))
        return Snapshot(n, parts)

    def resumable(self, snap: Snapshot, r: int) -> bool:
        """Whether a snapshot of n positions can resume at r <= n: its chunked layers hold the chunk of
        position n - 1 only, so r must lie in that chunk, or begin a chunk (nothing to hold)."""
        C = self.cfg.attention_chunk_size
        return r <= snap.n and (C is None or r // C == snap.n // C or r % C == 0)

    def restore(self, row: int, snap: Snapshot, r: int) -> None:
        """Row ``row`` as it was after the first ``r`` positions of the snapshot (`resumable`)."""
        for j, (i, k, v) in enumerate(zip(self.layers, self.k, self.v)):
            held = self._held(i, r)
            k.load(row, snap.parts[j][0], held)
            v.load(row, snap.parts[j][1], held)
        self.lengths[row] = r
