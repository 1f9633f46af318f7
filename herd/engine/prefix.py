"""Automatic prefix caching: the KV state of recent prompts, reused by a new prompt that starts the
same way (a system prompt, earlier turns of a chat), so only the rest is prefilled.

Each finished prefill leaves a `Snapshot` of its prompt's entries (herd.engine.cache), kept in
least-recently-used order within a byte budget. Snapshots are held in blocks of positions, and a
prompt that shares a prefix with a kept one shares that prefix's whole blocks (a system prompt is
held once, not once per conversation). A new prompt resumes from the snapshot sharing its
longest prefix, cut to a length Llama 4's layers allow: a chunked layer holds one attention chunk,
so the cut must lie in the chunk the snapshot ends in, or on a chunk boundary. Images are part of
the key: past its first image, a prefix is shared only with a prompt that has the same images.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.engine.cache import KVCache, Snapshot
from herd.engine.generate import Engine


def images_key(image_mask: torch.Tensor | None, image_features: torch.Tensor | None) -> tuple[int, str]:
    """(position of the first image token, or -1; a digest of the images' features)."""
    if image_mask is None or image_features is None or not bool(image_mask.any()):
        return -1, ""
    first = int(image_mask.nonzero()[0, 0])
    return first, hashlib.sha256(image_features.detach().float().cpu().numpy().tobytes()).hexdigest()


@dataclass
class _Entry:
    ids: tuple[int, ...]
    images: tuple[int, str]
    snapshot: Snapshot


class PrefixCache:
    """Snapshots of recent prompts within ``budget_bytes``; `hits`, `reused_tokens` for metrics."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.reused_tokens = self.lookups = 0
        self._next = 0
        self._held: dict[int, int] = {}  # data pointer of a block's tensor -> snapshots holding it

    @staticmethod
    def _common(e: _Entry, ids: list[int], images: tuple[int, str], most: int) -> int:
        """Positions (at most ``most``) that ``e``'s prompt and ``ids`` hold alike: the same tokens, and
        past a first image the same images."""
        n = min(len(e.ids), most)
        r = next((i for i in range(n) if e.ids[i] != ids[i]), n)
        if e.images != images:  # different pictures: share only what comes before both first images
            r = min(r, *(f for f in (e.images[0], images[0]) if f >= 0))
        return r

    def find(self, cache: KVCache, ids: Sequence[int], images: tuple[int, str]) -> tuple[Snapshot, int] | None:
        """The snapshot to resume ``ids`` from and the length to resume at (>= 1 token left to run)."""
        self.lookups += 1
        best, best_r, best_key = None, 0, None
        ids = list(ids)
        for key, e in self.entries.items():
            r = self._common(e, ids, images, len(ids) - 1)
            C = cache.cfg.attention_chunk_size
            if not cache.resumable(e.snapshot, r) and C is not None:
                r = r // C * C  # a chunk's start needs nothing from the chunked layers
            if r > best_r:
                best, best_r, best_key = e.snapshot, r, key
        if best is None:
            return None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best_r
        return best, best_r

    def add(self, engine: Engine, row: int, ids: Sequence[int], images: tuple[int, str]) -> None:
        """Keep what row ``row`` of ``engine``'s cache holds for ``ids`` (just prefilled), sharing the
        blocks of the prefix it has in common with a kept prompt, evicting the least recently used."""
        ids = list(ids)
        if any(e.ids == tuple(ids) and e.images == images for e in self.entries.values()):
            return
        if engine.cache.snapshot_bytes(len(ids)) > self.budget:
            return
        common = [(self._common(e, ids, images, len(ids)), e) for e in self.entries.values()]
        s, partner = max(common, key=lambda c: c[0], default=(0, None))
        snap = engine.snapshot(row, len(ids), (partner.snapshot, s) if s else None)
        key = self._next
        self._next += 1
        self.entries[key] = _Entry(tuple(ids), images, snap)
        self._count(snap, +1)
        while self.bytes > self.budget:
            old_key = next(iter(self.entries))
            if old_key == key:  # cannot happen: alone it fits (snapshot_bytes)
                break
            old = self.entries.pop(old_key)
            self._count(old.snapshot, -1)
            engine.forget(old.snapshot)

    def _count(self, snap: Snapshot, sign: int) -> None:
        """Blocks are counted once however many snapshots hold them."""
        for t in snap.tensors():
            ptr, size = t.data_ptr(), t.numel() * t.element_size()
            before = self._held.pop(ptr, 0)
            if before + sign:
                self._held[ptr] = before + sign
            self.bytes += size * ((before == 0) - (before + sign == 0))
