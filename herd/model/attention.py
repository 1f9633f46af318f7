"""Grouped-query attention with Llama 4's two layer kinds (iRoPE).

RoPE layers: rotary embedding, then weightless QK-norm, then *chunked local* attention — a query at
position p sees keys s with s <= p and s // C == p // C (C = attention_chunk_size). This is not a
sliding window: the first query of a chunk sees only itself.
NoPE layers: no rotary embedding, no QK-norm, full causal attention, and q scaled by the attention
temperature 1 + attn_scale * log(floor((p + 1) / floor_scale) + 1) — exactly 1 below floor_scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from herd.config import TextConfig
from herd.model.layers import Linear, apply_rope, rms_norm


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-position q multiplier of NoPE layers (arXiv:2501.19399, as customised by Meta)."""
    p = positions.to(torch.float32)
    return torch.log(torch.floor((p + 1.0) / floor_scale) + 1.0) * attn_scale + 1.0


def chunked_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where attention is allowed (chunk None: plain causal)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if chunk is not None:
        allowed &= (k_pos[None, :] // chunk) == (q_pos[:, None] // chunk)
    return allowed


@dataclass(frozen=True)
class Packing:
    """Packed rows (training) laid out for attention: every span a query may read — a document,
    or in a chunked layer one attention chunk of a document — becomes its own causal sequence, so
    the cost is the sum of the spans' squared lengths, not T^2 per row. Spans are padded to a
    multiple of a granule and grouped by that length (one attention call per group).

    ``index``: the (B*T-flattened) token at every place of every padded span, group after group;
    a span's padding repeats token 0, which no real query sees (causal) and whose outputs are
    dropped. ``shapes``: (spans, length) of each group. ``slots``: where each token's output lies
    in the groups' outputs concatenated; padding tokens read a zero row after them.
    """

    index: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    slots: torch.Tensor


def packing(segments_BT: torch.Tensor, positions_BT: torch.Tensor, chunk: int | None, granule: int = 64) -> Packing:
    """The `Packing` of rows whose documents carry segment ids (-1: padding) and positions that
    restart at 0 in each document: a query sees earlier tokens of its own document only, and in a
    chunked layer only those of its own chunk counted from the document's start, so every document
    is computed exactly as if it were alone at position 0."""
    seg, pos = segments_BT.reshape(-1), positions_BT.reshape(-1)
    dev = seg.device
    real = seg >= 0
    new_doc = torch.ones_like(segments_BT, dtype=torch.bool)  # a span never crosses rows or documents
    new_doc[:, 1:] = segments_BT[:, 1:] != segments_BT[:, :-1]
    starts_here = real & (new_doc.reshape(-1) | (pos % chunk == 0 if chunk is not None else pos == 0))
    starts = starts_here.nonzero().squeeze(1)  # each span's first token
    span = torch.cumsum(starts_here, 0) - 1  # span of every real token
    lengths = torch.bincount(span[real], minlength=starts.numel())
    g = min(granule, chunk) if chunk is not None else granule
    padded = (lengths + g - 1) // g * g
    index, shapes = [], []
    slots = torch.empty(seg.numel(), dtype=torch.long, device=dev)
    base = 0
    for L in padded.unique().tolist():
        members = (padded == L).nonzero().squeeze(1)
        offsets = torch.arange(L, device=dev)
        grid = starts[members, None] + offsets  # (spans, L)
        inside = offsets < lengths[members, None]
        index.append(torch.where(inside, grid, 0).flatten())
        slots[grid[inside]] = base + inside.flatten().nonzero().squeeze(1)
        shapes.append((members.numel(), L))
        base += grid.numel()
    slots[~real] = base
    return Packing(torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=dev), tuple(shapes), slots)


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: Packing, gqa: bool) -> torch.Tensor:
    """Attention of packed rows: q (B, T, H, Dh), k/v (B, T, G, Dh) -> (B, T, H, Dh)."""
    B, T, H, Dh = q.shape
    sizes = [n * L for n, L in packed.shapes]

    def spans(t: torch.Tensor) -> list[torch.Tensor]:  # one (spans, heads, L, Dh) per group
        t = t.reshape(B * T, *t.shape[2:])[packed.index]  # one gather (and one scatter back) per tensor
        return [x.view(n, L, *t.shape[1:]).transpose(1, 2) for x, (n, L) in zip(t.split(sizes), packed.shapes)]

    outs = [F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa).transpose(1, 2).reshape(-1, H, Dh)
            for qg, kg, vg in zip(spans(q), spans(k), spans(v))]
    return torch.cat(outs + [q.new_zeros(1, H, Dh)])[packed.slots].view(B, T, H, Dh)


@dataclass(frozen=True)
class CacheSlots:
    """Where a step's new tokens go in one kind of layer's cache, and what they read; the same for
    every layer of that kind, so computed once per step (see `cache_slots`)."""

    rows: slice  # the batch's cache rows (a slice keeps every cache read a view)
    row_ids: torch.Tensor  # (B, 1)
    slots: torch.Tensor  # (B, T) slot of each new token
    length: int  # entries read: up to the last query of the row that has seen most
    mask: torch.Tensor | CausalBias | None  # None: every read entry is visible


def cache_slots(pos_BT: torch.Tensor, rows: slice, chunk: int | None) -> CacheSlots:
    """B rows of T new tokens at consecutive positions inside one chunk: sharing their positions
    (prompts side by side), one token each at its own position (decode), or several at their own
    positions (a decode step with drafts); slot p % chunk, or p for global layers."""
    B, T = pos_BT.shape
    slots = pos_BT % chunk if chunk is not None else pos_BT
    row_ids = torch.arange(rows.start, rows.stop, device=pos_BT.device)[:, None]
    seen = slots[:, -1] + 1  # entries each row's last query may see (chunk start or 0 .. itself)
    length = int(seen.max())
    if B == 1 or (T > 1 and torch.equal(pos_BT, pos_BT[:1].expand(B, T))):
        # The T queries are the last T of the keys: causal aligned to the bottom right.
        return CacheSlots(rows, row_ids, slots, length, causal_lower_right(T, length) if T > 1 else None)
    # Each query sees the entries up to its own slot: those of its chunk (or sequence) so far.
    mask = torch.arange(length, device=pos_BT.device)[None, None, :] <= slots[:, :, None]  # (B, T, L)
    return CacheSlots(rows, row_ids, slots, length, mask[:, None])


class CacheEntries(Protocol):
    """One layer's cached keys (or values), as the engine keeps them (herd.engine.cache: in a float
    dtype, or int8 with scales): the model writes new tokens and reads entries, never the storage."""

    dtype: torch.dtype  # what `read` returns; attention runs in it

    def write(self, at: CacheSlots, x_BTGD: torch.Tensor) -> None:
        """Store the new tokens' K or V (B, T, G, Dh) in the rows and slots ``at`` names."""

    def read(self, at: CacheSlots) -> torch.Tensor:
        """The entries the step reads: (B, G, L, Dh), L = ``at.length``, in ``dtype``."""


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = cfg.uses_rope[layer]
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk = cfg.attention_chunk_size if self.use_rope else None
        self.gqa = cfg.n_heads != cfg.n_kv_heads
        self.norm_eps, self.floor_scale, self.attn_scale = cfg.norm_eps, cfg.floor_scale, cfg.attn_scale
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def _project(self, x_BTD: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor):
        """q (B, T, H, Dh), k and v (B, T, G, Dh), with RoPE, QK-norm and temperature as the layer needs;
        positions [1 or B, T] and rot [1 or B, T, Dh/2] (complex) give each token's absolute position."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, rot), apply_rope(k, rot)
        if self.use_qk_norm:  # per head, over Dh, after RoPE
            q, k = self.head_norm(q), self.head_norm(k)
        if self.temperature:
            scale = temperature_scale(positions, self.floor_scale, self.attn_scale)
            q = q * scale.view(scale.shape[0], T, 1, 1).to(q.dtype)
        return q, k, v

    def head_norm(self, x: torch.Tensor) -> torch.Tensor:
        """QK-norm: weightless RMS norm of each head over Dh (herd.kernels swaps in device paths)."""
        return rms_norm(x, self.norm_eps)

    def forward(self, x_BTD: torch.Tensor, positions: torch.Tensor, rot: torch.Tensor,
                packed: Packing | None = None) -> torch.Tensor:
        """Full forward, no cache: over sequences that start at position 0 (positions [1, T], packed
        None), or over packed rows with per-token positions [B, T] and their `packing`."""
        B, T, _ = x_BTD.shape
        q, k, v = self._project(x_BTD, positions, rot)
        if packed is None:
            out = self._attend(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)  # (B, T, H, Dh)
        else:
            out = attend_packed(q, k, v, packed, self.gqa)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def forward_cached(self, x_BTD: torch.Tensor, pos_BT: torch.Tensor, rot: torch.Tensor,
                       k_cache: CacheEntries, v_cache: CacheEntries, at: CacheSlots) -> torch.Tensor:
        """Attention for new tokens of cached sequences; their K/V are written into the cache first.

        k_cache/v_cache hold the layer's entries: slot p % C for a chunked layer (one chunk's
        worth), slot p for a global one; ``at`` (from `cache_slots`, shared by all layers of a kind)
        says which rows and slots the new tokens take and how much each query reads.
        """
        B, T, _ = x_BTD.shape
        q, k, v = (t.to(k_cache.dtype) for t in self._project(x_BTD, pos_BT, rot))  # attention in the cache's dtype
        k_cache.write(at, k)
        v_cache.write(at, v)
        # Every query reads its keys back from the cache, its own token's included: a cache that
        # rounds its entries (int8) rounds them for every query alike, in prefill as in decode.
        out = self.attend_cached(q.transpose(1, 2), k_cache.read(at), v_cache.read(at), at.mask)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim).to(x_BTD.dtype))

    def attend_cached(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      mask: torch.Tensor | CausalBias | None) -> torch.Tensor:
        """q (B, H, T, Dh) over cached keys/values (B, G, L, Dh) -> (B, H, T, Dh) (herd.kernels swaps in
        device paths)."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        C, T = self.chunk, q.shape[2]
        if C is None or T <= C:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        # Chunked local attention from position 0 is block-diagonal causal attention: fold the
        # chunks into the batch and run plain causal attention inside each. No T x T mask exists,
        # and the cost is T * C instead of T^2. The tail is padded to a whole chunk; causal masking
        # keeps real queries from seeing the padding, and the padded rows are dropped.
        n = -(-T // C)
        pad = n * C - T

        def fold(t: torch.Tensor) -> torch.Tensor:  # (B, h, T, Dh) -> (B*n, h, C, Dh)
            t = F.pad(t, (0, 0, 0, pad))
            return t.unflatten(2, (n, C)).transpose(1, 2).flatten(0, 1)

        out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True, enable_gqa=self.gqa)
        B, H = q.shape[:2]
        return out.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)[:, :, :T]
