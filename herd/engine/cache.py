"""A KV cache that knows Llama 4's layer kinds.

A RoPE layer with chunked attention never looks back past the start of the current chunk, so its
cache holds one chunk (C entries): position p lives in slot p % C, and a new chunk simply
overwrites the previous one (queries only ever read slots up to their own). A NoPE layer (global
attention) keeps the whole context. For Scout (C = 8192, 1 NoPE layer in 4) a 1M-token context
needs 12 full-length layers instead of 48.

All buffers are allocated once, for ``rows`` sequences of up to ``max_len`` tokens; each row
advances independently (rows join and leave between decode steps).
"""

from __future__ import annotations

import torch

from herd.config import TextConfig


def layer_capacity(cfg: TextConfig, layer: int, max_len: int) -> int:
    """Entries layer ``layer`` keeps for a context of max_len tokens."""
    chunk = cfg.attention_chunk_size
    if cfg.uses_rope[layer] and chunk is not None:
        return min(chunk, max_len)
    return max_len


def kv_cache_bytes(cfg: TextConfig, context_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of K and V for ``batch`` sequences of ``context_len`` tokens, as this cache allocates them."""
    per_entry = 2 * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return batch * per_entry * sum(layer_capacity(cfg, i, context_len) for i in range(cfg.n_layers))


def full_cache_bytes(cfg: TextConfig, context_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a cache that keeps every layer's entries for the whole context (the usual design)."""
    per_entry = 2 * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return batch * per_entry * cfg.n_layers * context_len


class KVCache:
    """Per layer K and V [rows, G, capacity, Dh]; ``lengths[r]`` = tokens of row r seen so far."""

    def __init__(self, cfg: TextConfig, rows: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        self.cfg, self.rows, self.max_len = cfg, rows, max_len
        shape = lambda i: (rows, cfg.n_kv_heads, layer_capacity(cfg, i, max_len), cfg.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(i), dtype=dtype, device=device) for i in range(cfg.n_layers)]
        self.v = [torch.zeros(shape(i), dtype=dtype, device=device) for i in range(cfg.n_layers)]
        self.lengths = [0] * rows

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated (K and V, all layers and rows)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def reset(self, row: int) -> None:
        """Forget row ``row`` (its slots are overwritten by the next sequence; nothing to clear)."""
        self.lengths[row] = 0
