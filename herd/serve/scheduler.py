"""The server's engine loop: one thread owns the model and a Batcher; requests wait in a bounded
queue, join the running batch between decode steps (up to a prompt-token budget per step, so a
burst joins at once, prefilled side by side in one forward per segment, while a long prompt stalls
the others for no more than its own prefill), and
leave as soon as they finish or their client goes away.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from herd.engine.batch import Batcher, Job
from herd.engine.generate import Engine
from herd.llm import LLM


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Stats:
    """Counters for /metrics (written by the engine thread, read by the server)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    ttft_sum: float = 0.0  # time to first token, summed over jobs that produced one
    ttft_count: int = 0
    decode_tokens_per_s: float = 0.0  # over the last decode step, all rows together


class Scheduler:
    def __init__(self, llm: LLM, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 after_step: Callable[[], None] | None = None):
        """``after_step`` runs on the engine thread after every admission or decode step (the
        server uses it to hand a whole step's events to its event loop in one wake-up)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.max_len = min(llm.config.text.max_seq_len, max_context or llm.config.text.max_seq_len)
        self.engine = Engine(llm.model, rows=max_batch, max_len=self.max_len, prefill_chunk=llm.prefill_chunk,
                             kv_dtype=llm.kv_dtype)
        self.batcher = Batcher(self.engine, llm.tokenizer)
        self.max_queue = max_queue
        self.waiting: collections.deque[tuple[Job, float]] = collections.deque()
        self.cond = threading.Condition()
        self.stats = Stats()
        self.closed = False
        self.after_step = after_step
        self.thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
        self.thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.batcher.seats)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (the n choices of one request go in together, or not at all)."""
        with self.cond:
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue})")
            now = time.perf_counter()
            self.waiting.extend((job, now) for job in jobs)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and not self.batcher.seats:
                    self.cond.wait()
                if self.closed:
                    return
                # Admit waiting jobs up to a prompt-token budget per iteration (at least one): a
                # burst of requests joins in a few iterations, yet one long prompt never holds
                # the running rows up for more than about its own prefill.
                entries, budget = [], self.engine.prefill_chunk
                while self.waiting and self.batcher.free > len(entries) and (
                        not entries or len(self.waiting[0][0].ids) <= budget):
                    entries.append(self.waiting.popleft())
                    budget -= len(entries[-1][0].ids)
            if entries:
                self._admit(entries)
            if self.batcher.seats:
                self._step()
            if self.after_step is not None:
                self.after_step()

    def _admit(self, entries: list[tuple[Job, float]]) -> None:
        """Prefill the admitted jobs together (one forward per segment for all of them)."""
        admitted = []
        for job, queued_at in entries:
            if job.cancelled:
                job.stop_reason = "cancelled"
                if job.on_event is not None:
                    job.on_event(job, "")
            else:
                admitted.append((job, queued_at))
                self.stats.prompt_tokens += len(job.ids)
        if not admitted:
            return
        jobs = [job for job, _ in admitted]
        try:
            self.batcher.add(*jobs)
        except Exception as e:  # a bad job must not take the loop down, nor the others with it
            if len(jobs) == 1:
                return self._fail(jobs, e)
            seated = {id(seat.job) for seat in self.batcher.seats}
            for job in jobs:
                if job.stop_reason is not None or id(job) in seated:
                    continue
                try:
                    self.batcher.add(job)
                except Exception as e1:
                    self._fail([job], e1)
        now = time.perf_counter()
        for job, queued_at in admitted:
            if job.token_ids:
                self.stats.ttft_sum += now - queued_at
                self.stats.ttft_count += 1
                self.stats.generated_tokens += 1
            self.stats.finished += job.stop_reason is not None

    def _step(self) -> None:
        jobs = [seat.job for seat in self.batcher.seats]
        before = sum(len(j.token_ids) for j in jobs)
        start = time.perf_counter()
        try:
            self.batcher.step()
        except Exception as e:
            self._fail(jobs, e)
            self.batcher.seats.clear()
            return
        made = sum(len(j.token_ids) for j in jobs) - before
        self.stats.generated_tokens += made
        self.stats.decode_tokens_per_s = made / max(time.perf_counter() - start, 1e-9)
        self.stats.finished += sum(j.stop_reason is not None for j in jobs)

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if job.stop_reason is None:
                job.stop_reason, job.error = "error", f"{type(error).__name__}: {error}"
                if job.on_event is not None:
                    job.on_event(job, "")
