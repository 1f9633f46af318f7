"""Continuous batching: sequences join a running batch, decode together one token per step, and
leave the moment they finish — the loop behind `llm.generate` (all prompts join at once) and
`herd serve` (requests join and leave between steps).

Cache rows are kept packed: the batch's sequences occupy rows 0..n-1, so every decode step reads
the cache through slices (views, never copies of the context). When a sequence leaves, the last
one moves into its row (a copy of that row's filled entries only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from herd.engine.constrain import Constraint
from herd.engine.generate import Engine, Sampling, adjusted, sample
from herd.engine.prefix import PrefixCache, images_key
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenLogprob:
    """The chosen token's log-probability under the model, and the ``top`` most likely tokens'."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Job:
    """One sequence to generate: what to do, and (filled as it runs) what happened.

    ``on_event(job, text)`` is called with each piece of newly final text (possibly "") after every
    token, and once more when the job ends (``job.stop_reason`` set). Set ``cancelled`` from any
    thread to make the job leave the batch at the next step (stop_reason "cancelled").
    """

    ids: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    logprobs: int | None = None  # None: off; k: the chosen token's and the top k (0..20) log-probabilities
    image_mask: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    on_event: Callable[[Job, str], None] | None = None
    cancelled: bool = False
    # results
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    stop_reason: str | None = None  # "stop" (stop token or string), "length", "cancelled", "error"
    error: str | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0


class _Text:
    """Incremental text of one job, holding back what could still become a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.decoder, self.stop, self.stop_ids = StreamDecoder(tokenizer), list(stop), tokenizer.stop_ids
        self.text, self.sent, self.hit = "", 0, False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        if token not in self.stop_ids:
            self.text += self.decoder.push(token)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.hit = self.text[:at], True
        hold = 0 if self.hit else max((len(s) - 1 for s in self.stop), default=0)
        return self._release(len(self.text) - hold)

    def finish(self) -> str:
        if not self.hit:
            self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        ready = self.text[self.sent:max(self.sent, upto)]
        self.sent += len(ready)
        return ready


@dataclass
class _Seat:
    job: Job
    text: _Text
    gen: torch.Generator | None
    last: int = -1
    started: float = 0.0
    constraint: Constraint | None = None
    wait: int = 0  # steps before this seat drafts again (after drafts that were all rejected)
    backoff: int = 0


def lookup(tokens: Sequence[int], k: int, sizes: Sequence[int] = (4, 3)) -> list[int]:
    """Prompt-lookup draft: up to ``k`` tokens that followed the latest earlier occurrence of the last
    n tokens (n in ``sizes``, longest first); [] when none recurs."""
    for n in sizes:
        if len(tokens) <= n:
            continue
        tail = list(tokens[-n:])
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start:start + n]) == tail:
                return list(tokens[start + n:start + n + k])
    return []


class Batcher:
    """Drives an Engine: `add` prefills jobs into the next free rows and picks their first tokens;
    `step` decodes every seated job by one token. Not thread-safe: one thread calls both."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, speculate: int = 0,
                 prefixes: PrefixCache | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        # Automatic prefix caching (herd.engine.prefix), where the engine's cache rows can be copied.
        self.prefixes = prefixes
        self.seats: list[_Seat] = []  # seats[i] owns cache row i
        # Prompt-lookup decoding: up to this many draft tokens per step, verified in the same forward.
        self.speculate = speculate
        self.drafted = self.accepted = 0  # draft tokens proposed and kept, for metrics

    @property
    def free(self) -> int:
        return self.engine.cache.rows - len(self.seats)

    def add(self, *jobs: Job) -> None:
        """Prefill ``jobs`` side by side into the next free rows (one forward per segment for all of
        them) and choose their first tokens (any may finish at once). A job that cannot run ends
        with stop_reason "error"; if the prefill itself fails, the batch is left as it was."""
        if len(jobs) > self.free:
            raise RuntimeError(f"{len(jobs)} jobs but {self.free} free rows in the batch")
        ready = []
        for job in jobs:
            if len(job.ids) + job.max_new_tokens > self.engine.cache.max_len:
                self._end(job, None, "error", f"{len(job.ids)} prompt tokens + max_new_tokens "
                          f"{job.max_new_tokens} exceed the engine's context of {self.engine.cache.max_len}")
            else:
                ready.append(job)
        if not ready:
            return
        ready.sort(key=lambda job: -len(job.ids))  # engine.prefill_rows takes the longest first
        start = time.perf_counter()
        resumed, fresh, images = [], [], {}
        for job in ready:
            images[id(job)] = images_key(job.image_mask, job.image_features)
            found = self.prefixes.find(self.engine.cache, job.ids, images[id(job)]) if self.prefixes else None
            (resumed if found else fresh).append((job, found))
        first = len(self.seats)
        logits = []
        if fresh:
            logits += list(self.engine.prefill_rows(first, [(j.ids, j.image_mask, j.image_features)
                                                            for j, _ in fresh]))
        for i, (job, (snap, r)) in enumerate(resumed):  # each from its reused prefix, alone
            row = first + len(fresh) + i
            self.engine.restore(row, snap, r)
            mask, feats = job.image_mask, job.image_features
            if mask is not None:
                feats, mask = feats[int(mask[:r].sum()):] if feats is not None else None, mask[r:]
            logits.append(self.engine.prefill_from(row, job.ids[r:], r, mask, feats))
        ready = [job for job, _ in fresh + resumed]
        if self.prefixes is not None:
            for i, job in enumerate(ready):
                self.prefixes.add(self.engine, first + i, job.ids, images[id(job)])
        logits = torch.stack(logits).float().cpu()
        now = time.perf_counter()
        for job, row in zip(ready, logits):
            s = job.sampling
            seat = _Seat(job, _Text(self.tokenizer, job.stop),
                         torch.Generator().manual_seed(s.seed) if s.seed is not None else None, started=now,
                         constraint=None if s.grammar is None else
                         Constraint(s.grammar, self.tokenizer, self.engine.model.cfg.vocab_size))
            job.prefill_s = now - start
            self.seats.append(seat)
            self._choose(seat, row)
        self._leave_finished()

    def step(self) -> None:
        """One decode step for every seated job; finished and cancelled jobs leave."""
        for seat in self.seats:
            if seat.job.cancelled and seat.job.stop_reason is None:
                self._end(seat.job, seat, "cancelled")
        self._leave_finished()
        if not self.seats:
            return
        drafts = self._drafts() if self.speculate else None
        if drafts is None:
            logits = self.engine.decode([seat.last for seat in self.seats]).float().cpu()
            for seat, row in zip(self.seats, logits):
                self._choose(seat, row)
        else:
            self._verify(drafts)
        self._leave_finished()

    def _drafts(self) -> list[list[int]] | None:
        """Each seat's draft (prompt lookup: what followed the last earlier occurrence of its last 4,
        else 3, tokens; pairs recur too often by chance in prose to be worth a wider step), all cut to the tokens every row can take this step: the step's positions stay
        inside each row's attention chunk (a chunked layer's cache holds one chunk, so a rejected
        draft must not have overwritten the current one) and inside the cache. None: nothing to try."""
        C, cache = self.engine.model.cfg.attention_chunk_size, self.engine.cache
        room = self.speculate
        for r in range(len(self.seats)):
            L = cache.lengths[r]
            room = min(room, cache.max_len - 1 - L, (C - 1 - L % C) if C is not None else room)
        if room < 1:
            return None
        drafts = []
        for seat in self.seats:
            seat.wait = max(0, seat.wait - 1)
            drafts.append([] if seat.wait else lookup(seat.job.ids + seat.job.token_ids, room))
        return drafts if any(drafts) else None

    def _verify(self, drafts: list[list[int]]) -> None:
        """One forward over each seat's last token and its draft; tokens are then chosen one position
        at a time as a plain step would (same sampler, same generator draws), keeping the draft while
        it agrees. Exact for greedy and for sampling alike: each kept token was drawn from the model's
        own distribution at its position."""
        T = 1 + max(len(d) for d in drafts)
        rows = [[seat.last] + d + [seat.last] * (T - 1 - len(d)) for seat, d in zip(self.seats, drafts)]
        logits = self.engine.decode_drafts(rows).float().cpu()  # [B, T, V]
        for r, (seat, draft) in enumerate(zip(self.seats, drafts)):
            kept = 0
            for j in range(T):
                self._choose(seat, logits[r, j])
                if seat.job.stop_reason is not None or j >= len(draft) or seat.last != draft[j]:
                    break
                kept += 1
            self.engine.cache.lengths[r] += 1 + kept
            self.drafted, self.accepted = self.drafted + len(draft), self.accepted + kept
            if draft:  # where drafts keep failing (text that repeats nothing), draft ever more rarely
                seat.backoff = 0 if kept else min(2 * seat.backoff + 1, 32)
                seat.wait = seat.backoff

    def _choose(self, seat: _Seat, logits_V: torch.Tensor) -> None:
        """Pick ``seat``'s next token. A failure here (sampling, stop strings, detokenizing, the
        job's own callback) ends this job with an error and never its batch neighbours."""
        try:
            self._pick(seat, logits_V)
        except Exception as e:
            if seat.job.stop_reason is None:
                self._end(seat.job, None, "error", f"{type(e).__name__}: {e}")

    def _pick(self, seat: _Seat, logits_V: torch.Tensor) -> None:
        job = seat.job
        logits = adjusted(logits_V, job.sampling, job.ids, job.token_ids)
        if seat.constraint is not None:
            logits = seat.constraint.mask(logits)
        token = sample(logits, job.sampling, seat.gen)
        if seat.constraint is not None:
            seat.constraint.advance(token)
        seat.last = token
        job.token_ids.append(token)
        if job.logprobs is not None:
            lp = torch.log_softmax(logits_V, dim=-1)
            top = torch.topk(lp, job.logprobs) if job.logprobs else None
            job.token_logprobs.append(TokenLogprob(token, float(lp[token]), list(zip(
                top.indices.tolist(), top.values.tolist())) if top is not None else []))
        piece = seat.text.push(token)
        if seat.text.hit or token in self.tokenizer.stop_ids or (
                seat.constraint is not None and seat.constraint.complete(self.tokenizer.stop_ids)):
            reason = "stop"
        elif len(job.token_ids) >= job.max_new_tokens:
            reason = "length"
        else:
            job.text = seat.text.text
            if job.on_event is not None:
                job.on_event(job, piece)
            return
        self._end(job, seat, reason, piece=piece)

    def _end(self, job: Job, seat: _Seat | None, reason: str, error: str | None = None, piece: str = "") -> None:
        if seat is not None:
            piece += seat.text.finish()
            job.text = seat.text.text
            job.decode_s = time.perf_counter() - seat.started
        job.stop_reason, job.error = reason, error
        if job.on_event is not None:
            job.on_event(job, piece)

    def _leave_finished(self) -> None:
        kept = [s for s in self.seats if s.job.stop_reason is None]
        if len(kept) == len(self.seats):
            return
        # Pack the survivors into rows 0..n-1, moving each only if its row changes.
        old_row = {id(s): i for i, s in enumerate(self.seats)}
        for new, seat in enumerate(kept):
            if old_row[id(seat)] != new:
                self.engine.move_row(old_row[id(seat)], new)
        self.seats = kept
