"""Generation: chunked prefill into a layer-aware KV cache, then one token per decode step.

`Engine` owns a KVCache with a row per sequence. `prefill(row, ...)` runs a prompt (and
`prefill_rows` several side by side) through the model in segments (never more than
`prefill_chunk` tokens, never across an attention-chunk boundary, so no T x T mask or score
matrix exists for long prompts); `decode(tokens)` advances every row by one token at its own
position. `herd.engine.batch.Batcher` is the loop over both that `LLM.generate` / `LLM.stream`
and the server drive.

`full_forward_tokens` is the slow reference: a full forward per new token, no cache. The cached
engine must reproduce it token for token (tests/test_engine.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from herd.engine.cache import KVCache, Snapshot
from herd.model.transformer import TextModel


# Temperatures below this pick the most likely token: dividing logits by a float32 temperature near
# 0 (or subnormal) overflows to inf and the softmax to NaN. vLLM uses the same threshold.
GREEDY_BELOW = 1e-5


class EngineFailed(RuntimeError):
    """The engine can run no further step (a rank of its tensor-parallel group is gone)."""


@dataclass(frozen=True)
class Sampling:
    """How to pick each token: the logits adjusted by the penalties and biases (`adjusted`), then
    greedy at temperature 0 (or below GREEDY_BELOW), else temperature + top-k / top-p / min-p."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token the output already holds
    frequency_penalty: float = 0.0  # minus this times how often the output holds it
    repetition_penalty: float = 1.0  # HF's and vLLM's: a seen token's (prompt or output) logit / r if > 0, else * r
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    grammar: str | None = None  # llguidance's grammar the output must follow (herd.engine.constrain)

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2 <= v <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if not (isinstance(r, (int, float)) and 0 < r <= 10):
            raise ValueError(f"repetition_penalty must be in (0, 10], got {r!r}")
        for token, bias in (self.logit_bias or {}).items():
            if not (isinstance(token, int) and token >= 0 and isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias maps token ids (>= 0) to numbers in [-100, 100], got {token!r}: {bias!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """Every biased token must be in the vocabulary."""
        outside = [t for t in (self.logit_bias or {}) if t >= vocab_size]
        if outside:
            raise ValueError(f"logit_bias: token id {outside[0]} is outside the vocabulary (size {vocab_size})")


def adjusted(logits_V: torch.Tensor, s: Sampling, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> torch.Tensor:
    """The logits the sampler draws from: the repetition penalty over prompt and output, the presence
    and frequency penalties over the output, then the logit bias (vLLM's order). Untouched when
    nothing is asked."""
    if s.repetition_penalty == 1 and not (s.presence_penalty or s.frequency_penalty) and not s.logit_bias:
        return logits_V
    out = logits_V.clone()
    if s.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if seen.numel():
            v = out[seen]
            out[seen] = torch.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    if (s.presence_penalty or s.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=out.numel())[:out.numel()]
        out -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0)
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias), dtype=torch.long)
        out[ids] += torch.tensor(list(s.logit_bias.values()), dtype=out.dtype)
    return out


def sample(logits_V: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token id from float32 logits [V] (filters applied in the order top-k, top-p, min-p)."""
    if s.temperature < GREEDY_BELOW:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.float() / s.temperature, dim=-1)
    if s.top_k and s.top_k < probs.numel():
        kth = torch.topk(probs, s.top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p * sorted_p.sum()
        keep[0] = True  # the most likely token stays, even where top_p * sum rounds to 0 in float32
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    if s.min_p > 0:
        probs = torch.where(probs < s.min_p * probs.max(), 0.0, probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def default_prefill_chunk(dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per prefill segment. Longer segments amortise per-call costs: a GPU's launches, and on
    a CPU the up-casting of half-precision expert weights for each segment; float32 gains nothing
    from them, so it keeps 512 and small activations (docs/performance.md)."""
    if device.type != "cpu":
        return 4096
    return 2048 if dtype in (torch.bfloat16, torch.float16) else 512


class Engine:
    """A model plus a KV cache of ``rows`` sequences of up to ``max_len`` tokens. ``kv_dtype``: the
    cache's dtype (a name or torch dtype; the weights' dtype unless given; herd.kernels.cache_dtype
    is the fast float choice); an int8 cache is read back in ``kv_read_dtype`` (default: the weights').
    ``kv_heads``: KV heads per cache row (default the config's; a tensor-parallel rank keeps its own);
    ``layers``: the layers the model holds (default all; a pipeline stage's own, see KVCache).

    Every model call goes through `_step`, one plan per call (herd.distributed replays them on the
    other ranks of a tensor-parallel group).
    """

    def __init__(self, model: TextModel, rows: int, max_len: int, prefill_chunk: int | None = None,
                 kv_dtype: str | torch.dtype | None = None, kv_read_dtype: torch.dtype | None = None,
                 kv_heads: int | None = None, layers: range | None = None):
        w = model.tok_embeddings.weight
        self.model = model
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(w.dtype, w.device)
        self.cache = KVCache(model.cfg, rows, max_len, kv_dtype or w.dtype, w.device, kv_read_dtype or w.dtype,
                             kv_heads=kv_heads, layers=layers)
        self.device = w.device

    def _step(self, ids_BT: torch.Tensor, pos_BT: torch.Tensor, rows: slice, take: torch.Tensor,
              image_mask_BT: torch.Tensor | None = None, image_features: torch.Tensor | None = None
              ) -> torch.Tensor | None:
        """One model call: new tokens ids [B, T] at positions [B, T] (image features in place of the
        masked ones) through every block over cache rows ``rows``; float32 logits [n, V] of the n tokens
        ``take`` names (indices into the B*T tokens, row-major), or None when it names none."""
        h = self.model.decode_cached(self.model.embed(ids_BT, image_mask_BT, image_features), pos_BT,
                                     self.cache.k, self.cache.v, rows)  # (B, T, D)
        return self.model.head(h.flatten(0, 1)[take]) if take.numel() else None

    def _segment_end(self, start: int, end: int, size: int) -> int:
        """Where a prefill segment from ``start`` stops: at most ``size`` tokens and ``end``, and
        inside one attention chunk."""
        C = self.model.cfg.attention_chunk_size
        end = min(end, start + size)
        return min(end, (start // C + 1) * C) if C is not None else end

    def prefill(self, row: int, tokens: Sequence[int], image_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Run a prompt [T] into cache row ``row``; returns float32 logits [V] of its last token.

        ``image_mask`` [T] marks <|patch|> positions that take ``image_features`` [n, D] in order.
        """
        return self.prefill_rows(row, [(tokens, image_mask, image_features)])[0]

    @torch.inference_mode()
    def prefill_rows(self, first: int, prompts: Sequence[tuple[Sequence[int], torch.Tensor | None,
                                                               torch.Tensor | None]]) -> torch.Tensor:
        """Run prompts side by side into cache rows ``first``, ``first + 1``, ...: (tokens, image_mask,
        image_features) each, longest first. Returns float32 logits [n, V] of each one's last token.

        All prompts start at position 0, so their segments share positions and chunk boundaries;
        a row leaves once its prompt is done (rows stay one slice because the longest come first),
        and the tail of its last segment is padding whose cache entries lie past its length, where
        the decode steps that follow overwrite them before anything reads them. A segment holds at
        most about ``prefill_chunk`` tokens in all (fewer positions when many rows take part).
        """
        lengths = [len(t) for t, _, _ in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError("the prompt is empty")
        if lengths[0] > self.cache.max_len:
            raise ValueError(f"prompt of {lengths[0]} tokens exceeds the cache's {self.cache.max_len}")
        if any(a < b for a, b in zip(lengths, lengths[1:])):
            raise ValueError("prompts must come longest first")
        if first + len(prompts) > self.cache.rows:
            raise ValueError(f"rows {first}..{first + len(prompts) - 1} do not exist (the cache has {self.cache.rows})")
        n, T = len(prompts), lengths[0]
        ids = torch.zeros(n, T, dtype=torch.long)
        masks = torch.zeros(n, T, dtype=torch.bool) if any(m is not None for _, m, _ in prompts) else None
        for i, (tokens, mask, _) in enumerate(prompts):
            ids[i, :lengths[i]] = torch.as_tensor(list(tokens), dtype=torch.long)
            if mask is not None:
                masks[i, :lengths[i]] = mask.cpu()
        ids = ids.to(self.device)
        used = [0] * n  # image features consumed per row
        last: list[torch.Tensor | None] = [None] * n
        start = 0
        while start < T:
            a = sum(length > start for length in lengths)  # rows still in their prompt
            end = self._segment_end(start, T, max(1, self.prefill_chunk // a))
            seg = ids[:a, start:end]
            mask = feats = None
            if masks is not None and masks[:a, start:end].any():
                mask = masks[:a, start:end]
                parts = []
                for i in range(a):
                    k = int(mask[i].sum())
                    if k:
                        parts.append(prompts[i][2][used[i]:used[i] + k])
                        used[i] += k
                mask, feats = mask.to(self.device), torch.cat(parts)
            pos = torch.arange(start, end, device=self.device)[None].expand(a, -1)
            ending = [i for i in range(a) if lengths[i] <= end]  # rows whose last prompt token is here
            take = torch.tensor([i * (end - start) + lengths[i] - 1 - start for i in ending], dtype=torch.long)
            logits = self._step(seg, pos, slice(first, first + a), take.to(self.device), mask, feats)
            for j, i in enumerate(ending):
                last[i] = logits[j]
            start = end
        for i, length in enumerate(lengths):
            self.cache.lengths[first + i] = length
        return torch.stack(last)

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One new token for each of rows 0..B-1 (B = len(tokens)) at its row's next position;
        returns float32 logits [B, V]."""
        B = len(tokens)
        lengths = self.cache.lengths[:B]
        if max(lengths) >= self.cache.max_len:
            raise ValueError(f"a row reached the cache's {self.cache.max_len} tokens")
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        pos = torch.as_tensor(lengths, dtype=torch.long, device=self.device)[:, None]
        logits = self._step(ids, pos, slice(0, B), torch.arange(B, device=self.device))
        for r in range(B):
            self.cache.lengths[r] += 1
        return logits

    @torch.inference_mode()
    def prefill_from(self, row: int, tokens: Sequence[int], start: int, image_mask: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Run the rest of a prompt, ``tokens`` at positions ``start``.., into cache row ``row`` whose
        first ``start`` positions are already there (a reused prefix); float32 logits [V] of the last."""
        T = len(tokens)
        if not (0 < T and start + T <= self.cache.max_len):
            raise ValueError(f"need 1 to {self.cache.max_len - start} tokens after position {start}, got {T}")
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        used, a, last = 0, 0, None
        while a < T:
            b = self._segment_end(start + a, start + T, self.prefill_chunk) - start
            mask = feats = None
            if image_mask is not None and image_mask[a:b].any():
                k = int(image_mask[a:b].sum())
                mask, feats = image_mask[a:b].to(self.device)[None], image_features[used:used + k]
                used += k
            pos = torch.arange(start + a, start + b, device=self.device)[None]
            last = self._step(ids[:, a:b], pos, slice(row, row + 1), torch.tensor([b - a - 1], device=self.device),
                              mask, feats)
            a = b
        self.cache.lengths[row] = start + T
        return last[0]

    @torch.inference_mode()
    def decode_drafts(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each of rows 0..B-1 takes T tokens (its next token, then a draft) at its next positions, all
        inside its attention chunk and cache; returns float32 logits [B, T, V]. The cache lengths are
        left to the caller, who knows how much of each draft it kept."""
        B, T = len(rows), len(rows[0])
        lengths = torch.as_tensor(self.cache.lengths[:B], dtype=torch.long, device=self.device)
        ids = torch.as_tensor([list(r) for r in rows], dtype=torch.long, device=self.device)
        pos = lengths[:, None] + torch.arange(T, device=self.device)
        return self._step(ids, pos, slice(0, B), torch.arange(B * T, device=self.device)).view(B, T, -1)

    @torch.inference_mode()
    def prefill_logits(self, row: int, tokens: Sequence[int], image_mask: torch.Tensor | None = None,
                       image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``tokens`` [T] into cache row ``row`` from position 0, as `prefill` does, and return the
        float32 logits [T, V] of every position (how herd.evaluate scores through the cache)."""
        T = len(tokens)
        if not 0 < T <= self.cache.max_len:
            raise ValueError(f"need 1 to {self.cache.max_len} tokens (the cache's length), got {T}")
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[None]
        out = []
        start = used = 0
        while start < T:
            end = self._segment_end(start, T, self.prefill_chunk)
            mask = feats = None
            if image_mask is not None and image_mask[start:end].any():
                k = int(image_mask[start:end].sum())
                mask, feats = image_mask[start:end].to(self.device)[None], image_features[used:used + k]
                used += k
            pos = torch.arange(start, end, device=self.device)[None]
            out.append(self._step(ids[:, start:end], pos, slice(row, row + 1), torch.arange(end - start, device=self.device),
                                  mask, feats))
            start = end
        self.cache.lengths[row] = T
        return torch.cat(out)

    def move_row(self, src: int, dst: int) -> None:
        """Move a sequence from cache row ``src`` to row ``dst`` (its filled entries only)."""
        self.cache.move_row(src, dst)

    def snapshot(self, row: int, n: int, shared: tuple[Snapshot, int] | None = None) -> Snapshot:
        """Copies of what row ``row`` holds for its first ``n`` positions (prefix caching), sharing the
        whole blocks of ``shared``'s first s positions (`KVCache.snapshot`)."""
        return self.cache.snapshot(row, n, shared)

    def restore(self, row: int, snap: Snapshot, r: int) -> None:
        """Row ``row`` as it was after the first ``r`` positions of ``snap`` (`KVCache.resumable`)."""
        self.cache.restore(row, snap, r)

    def forget(self, snap: Snapshot) -> None:
        """``snap`` will not be restored again (the prefix cache evicted it)."""


@torch.inference_mode()
def full_forward_tokens(model: TextModel, prompt: list[int], max_new_tokens: int,
                        stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens by a full forward over the whole sequence per step: the reference for the engine."""
    ids = torch.tensor([prompt], device=model.tok_embeddings.weight.device)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids)[0, -1].argmax())
        out.append(nxt)
        if nxt in stop_ids:
            break
        ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return out
