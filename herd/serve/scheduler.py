"""The server's engine loop: one thread owns the model and a Batcher; requests wait in a bounded
queue, join the running batch between decode steps (up to a prompt-token budget per step, so a
burst joins at once, prefilled side by side in one forward per segment, while a long prompt stalls
the others for no more than its own prefill), and
leave as soon as they finish or their client goes away.

`Scheduler` runs that loop on a thread of the calling process. `EngineProcess` runs it in a child
process (on CPUs, what `herd serve` uses): there the HTTP side's Python never holds the engine's
interpreter lock and the engine's core is its own (docs/serving.md, "How requests run", has the
measurements).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from herd.engine.batch import Batcher, Job
from herd.engine.prefix import PrefixCache
from herd.engine.generate import EngineFailed
from herd.llm import LLM


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


class EngineGone(Exception):
    """The engine process exited (killed, out of memory): no request can run until a restart."""


@dataclass
class Stats:
    """Counters for /metrics (written by the engine thread, read by the server)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    ttft_sum: float = 0.0  # time to first token, summed over jobs that produced one
    ttft_count: int = 0
    decode_tokens_per_s: float = 0.0  # over the last decode step, all rows together
    draft_tokens: int = 0  # prompt-lookup decoding: tokens drafted, and kept
    draft_tokens_kept: int = 0
    prefix_lookups: int = 0  # prompts looked up in the prefix cache, those that reused one, tokens reused
    prefix_hits: int = 0
    prefix_reused_tokens: int = 0
    prefix_cache_bytes: int = 0


class Scheduler:
    def __init__(self, llm: LLM, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 after_step: Callable[[], None] | None = None):
        """``after_step`` runs on the engine thread after every admission or decode step (the
        server uses it to hand a whole step's events to its event loop in one wake-up)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.max_len = min(llm.config.text.max_seq_len, max_context or llm.config.text.max_seq_len)
        self.engine = llm.engine(llm.model, rows=max_batch, max_len=self.max_len, prefill_chunk=llm.prefill_chunk,
                             kv_dtype=llm.kv_dtype, kv_read_dtype=llm.kv_read_dtype)
        self.batcher = Batcher(self.engine, llm.tokenizer, llm.speculate,
                               PrefixCache(llm.prefix_cache_bytes) if llm.prefix_cache_bytes else None)
        self.max_queue = max_queue
        self.waiting: collections.deque[tuple[Job, float]] = collections.deque()
        self.cond = threading.Condition()
        self.stats = Stats()
        self.closed = False
        self.error: str | None = None  # why the engine can run no more steps (EngineFailed)
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
            if self.error is not None:
                raise EngineGone(self.error)
            if self.closed:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue})")
            now = time.perf_counter()
            self.waiting.extend((job, now) for job in jobs)
            self.cond.notify()

    def cancel(self, jobs: list[Job]) -> None:
        """Make these jobs leave the batch at the next step (no-op for finished ones)."""
        for job in jobs:
            job.cancelled = True

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
            if len(jobs) == 1 or isinstance(e, EngineFailed):
                self._fail(jobs, e)
                return self._broken(e) if isinstance(e, EngineFailed) else None
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
        p = self.batcher.prefixes
        if p is not None:
            st = self.stats
            st.prefix_lookups, st.prefix_hits, st.prefix_reused_tokens = p.lookups, p.hits, p.reused_tokens
            st.prefix_cache_bytes = p.bytes

    def _step(self) -> None:
        jobs = [seat.job for seat in self.batcher.seats]
        before = sum(len(j.token_ids) for j in jobs)
        start = time.perf_counter()
        try:
            self.batcher.step()
        except Exception as e:
            self._fail(jobs, e)
            self.batcher.seats.clear()
            if isinstance(e, EngineFailed):
                self._broken(e)
            return
        made = sum(len(j.token_ids) for j in jobs) - before
        self.stats.generated_tokens += made
        self.stats.decode_tokens_per_s = made / max(time.perf_counter() - start, 1e-9)
        self.stats.finished += sum(j.stop_reason is not None for j in jobs)
        self.stats.draft_tokens, self.stats.draft_tokens_kept = self.batcher.drafted, self.batcher.accepted

    def _broken(self, e: EngineFailed) -> None:
        """No step can run any more: fail what waits, refuse what comes (health reports it)."""
        with self.cond:
            self.error = str(e)
            waiting = [job for job, _ in self.waiting]
            self.waiting.clear()
        self._fail(waiting, e)

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if job.stop_reason is None:
                job.stop_reason, job.error = "error", f"{type(error).__name__}: {error}"
                if job.on_event is not None:
                    job.on_event(job, "")


class EngineProcess:
    """The same engine loop in a forked child process, behind the Scheduler's interface (``submit``,
    ``cancel``, ``close``, ``stats``, ``queue_depth``, ``running``, ``max_len``): Jobs live in this
    process; the child gets each job's inputs and sends back, after every step, what each job gained
    (tokens, log-probabilities, text, its end), which this process applies to its Job before calling
    ``on_event`` and then ``after_step``, on a reader thread, as the engine thread would.

    The child is forked, so it shares the loaded weights (copy-on-write: nothing writes them) and
    this process keeps them for the image encoder. Fork only before this process has run torch
    work on more than one thread: OpenMP's thread pool does not survive a fork (the child's first
    parallel op would hang); `herd serve` loads with one thread and hands ``threads`` to the child.
    Where this process may use more cores than ``threads``, the child is pinned to the first
    ``threads`` of them and this process (HTTP, tokenizing, image encoding) to the rest (`split_cores`).
    """

    def __init__(self, llm: LLM, max_batch: int = 8, max_queue: int = 64, max_context: int | None = None,
                 after_step: Callable[[], None] | None = None, threads: int = 1):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.max_len = min(llm.config.text.max_seq_len, max_context or llm.config.text.max_seq_len)
        self.max_queue, self.after_step = max_queue, after_step
        self.stats = Stats()
        # Unfinished jobs by id(job), which is also their id in the child; those without a token
        # yet are the waiting ones.
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()  # jobs, the pipe's sending end
        self.closed, self.error = False, None
        engine_cores, http_cores = split_cores(threads)
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_child, name="herd-engine", daemon=True,
                                args=(llm, child, max_batch, max_queue, max_context, threads, engine_cores))
        self.proc.start()
        child.close()
        # This process (HTTP, tokenizing, image encoding) takes the cores the engine leaves: this
        # thread (the event loop's) and every thread it starts from now on, torch's included.
        if http_cores:
            os.sched_setaffinity(0, http_cores)
        torch.set_num_threads(len(http_cores) or threads)
        self.reader = threading.Thread(target=self._read, name="herd-engine-reader", daemon=True)
        self.reader.start()

    def _waiting(self) -> int:  # the lock held
        return sum(not job.token_ids for job in self.jobs.values())

    @property
    def queue_depth(self) -> int:
        with self.lock:
            return self._waiting()

    @property
    def running(self) -> int:
        with self.lock:
            return len(self.jobs) - self._waiting()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all or none); QueueFull beyond ``max_queue`` waiting. Jobs in their prefill
        still count as waiting here, so the child's own queue never refuses what this one took."""
        with self.lock:
            if self.error:
                raise EngineGone(f"{self.error}; restart the server")
            if self.error is not None:
                raise EngineGone(self.error)
            if self.closed:
                raise QueueFull("the server is shutting down")
            waiting = self._waiting()
            if waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (limit {self.max_queue})")
            self.jobs.update((id(job), job) for job in jobs)
            specs = [(id(job), job.ids, job.max_new_tokens, job.sampling, list(job.stop), job.logprobs,
                      job.image_mask, job.image_features) for job in jobs]
            try:
                self.conn.send_bytes(pickle.dumps(("submit", specs)))
            except OSError:  # the child is gone; the reader thread is failing what it had
                for job in jobs:
                    del self.jobs[id(job)]
                raise EngineGone("the engine process exited; restart the server") from None

    def cancel(self, jobs: list[Job]) -> None:
        with self.lock:
            for job in jobs:
                job.cancelled = True
            ids = [id(job) for job in jobs if id(job) in self.jobs]
            if ids and not self.closed:
                try:
                    self.conn.send_bytes(pickle.dumps(("cancel", ids)))
                except OSError:  # the child is gone: nothing runs to cancel
                    pass

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                try:
                    self.conn.send_bytes(pickle.dumps(("close", None)))
                except OSError:
                    pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
        self.reader.join(timeout=5)

    def _read(self) -> None:
        """Reader thread: apply each step's news to the Jobs, then call their on_event and after_step."""
        while True:
            try:
                news, stats = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            self.stats = stats
            for jid, piece, tokens, logprobs, end in news:
                with self.lock:
                    job = self.jobs.get(jid)
                    if job is None:
                        continue
                    job.token_ids += tokens
                    job.token_logprobs += logprobs
                    if end is not None:
                        job.text, job.stop_reason, job.error, job.prefill_s, job.decode_s = end
                        del self.jobs[jid]
                if job.on_event is not None:
                    job.on_event(job, piece)
            if self.after_step is not None:
                self.after_step()
        # The child is gone: whatever was still running ends with an error.
        self.proc.join(timeout=5)
        with self.lock:
            if not self.closed:
                self.error = f"the engine process exited (code {self.proc.exitcode})"
            self.closed = True
            left, self.jobs = list(self.jobs.values()), {}
        for job in left:
            job.stop_reason, job.error = "error", self.error or "the server is shutting down"
            if job.on_event is not None:
                job.on_event(job, "")
        if left and self.after_step is not None:
            self.after_step()


def split_cores(threads: int) -> tuple[list[int], list[int]]:
    """The engine's cores and the HTTP side's when this process may use more cores than the engine's
    ``threads`` (the first ``threads`` for the engine, the rest for HTTP); ([], []) otherwise (no
    pinning). Pinned, neither side's wake-ups land on the other's core."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cores[:threads], cores[threads:]) if len(cores) > threads else ([], [])


def _engine_child(llm: LLM, conn, max_batch: int, max_queue: int, max_context: int | None, threads: int,
                  cores: list[int]) -> None:
    """The child's main: a Scheduler whose events go back through ``conn`` after every step; this
    thread reads submissions and cancellations. Ends when told to, or when the parent's end closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent closes us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the server's handlers inherited by the fork
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)
    jobs: dict[int, Job] = {}  # unfinished, by id
    sent: dict[int, tuple[int, int]] = {}  # tokens and log-probabilities already sent, per job
    news: list[tuple] = []
    lock = threading.Lock()  # news and the pipe: the engine thread sends, this one may too (refusals)

    def on_event(jid: int, job: Job, piece: str) -> None:
        n, k = sent.get(jid, (0, 0))
        end = None
        if job.stop_reason is not None:
            end = (job.text, job.stop_reason, job.error, job.prefill_s, job.decode_s)
            sent.pop(jid, None)
            jobs.pop(jid, None)
        else:
            sent[jid] = (len(job.token_ids), len(job.token_logprobs))
        with lock:
            news.append((jid, piece, job.token_ids[n:], job.token_logprobs[k:], end))

    def after_step() -> None:
        with lock:
            if news:
                conn.send_bytes(pickle.dumps((news[:], dataclasses.replace(scheduler.stats))))
                news.clear()

    scheduler = Scheduler(llm, max_batch, max_queue, max_context, after_step)
    try:
        while True:
            try:
                kind, body = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if kind == "close":
                break
            if kind == "submit":
                new = []
                for jid, ids, max_new, sampling, stop, logprobs, mask, features in body:
                    jobs[jid] = Job(ids, max_new, sampling, stop, logprobs, mask, features,
                                    on_event=lambda job, piece, jid=jid: on_event(jid, job, piece))
                    new.append(jobs[jid])
                try:
                    scheduler.submit(new)
                except QueueFull as e:  # not expected: the parent counts conservatively
                    Scheduler._fail(new, e)
                    after_step()
            elif kind == "cancel":
                for jid in body:
                    if jid in jobs:
                        jobs[jid].cancelled = True
    finally:
        scheduler.close()
        conn.close()
