"""One step plan for every rank of a tensor-parallel group: rank 0 decides, the others follow.

Rank 0 runs the ordinary generation loop (tokenizer, Batcher, sampling, printing) over a
`LeaderEngine`. Before each model call (`Engine._step`) and each cache change it broadcasts the plan:
one fixed-size int64 tensor over the gloo ``control`` group. The other ranks sit in `follow`, read
each plan and make the same call on their own shard and KV cache, so every rank issues the same
collectives in the same order: per forward step, one broadcast, 2 all-reduces per layer, and one
gather when the step takes logits. Which collectives run depends on the plan only, never on the data
(a rank whose experts got no tokens still reaches the same all-reduces).

Plan layout (N = ``tp.step_tokens``): 8 header ints, then N token ids, N row start positions, N
taken token indices, N image-mask flags. Kinds:
  ENGINE  rows, max_len, KV dtype, read dtype        a new Engine (a new KV cache)
  FORWARD first row, B, T, n taken, n image rows     `Engine._step`; positions start[b] + t; with
                                                     image rows, their features follow in a second
                                                     broadcast ([n, D], encoded on rank 0 only)
  MOVE    src, dst, entries                          `Engine.move_row`
  SAVE    row, n, key, shared key, s               `Engine.snapshot` (prefix caching), kept as ``key``,
                                                     sharing snapshot ``shared key``'s blocks of s positions
  RESTORE row, key, r                                `Engine.restore` of snapshot ``key``
  FORGET  key                                        `Engine.forget`: the prefix cache evicted it
  STOP                                               `follow` returns

Faults: the model's collectives time out (`init`'s ``timeout``); the plans' group waits as long as
the server idles. A step that fails on rank 0 raises `GroupFailed` naming the ranks that are gone
(each follower leaves its host and pid, and a note when it raises, in the group's store).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist

from herd.distributed.tensor import BYTES, COUNTS, TensorParallel, check_sizes
from herd.engine.cache import KV_DTYPES
from herd.engine.generate import Engine, EngineFailed, default_prefill_chunk
from herd.model.transformer import TextModel

ENGINE, FORWARD, MOVE, STOP, SAVE, RESTORE, FORGET = 1, 2, 3, 4, 5, 6, 7
HEADER = 8
PARTS = 4  # token ids, row starts, taken indices, image mask
_DTYPES = list(KV_DTYPES.values())  # a dtype travels as its index here


class GroupFailed(EngineFailed):
    """A collective failed: a rank of the group is gone, and no step can run any more."""


def _send(tp: TensorParallel, header: list[int], ids=None, starts=None, take=None, mask=None) -> None:
    N = tp.step_tokens
    plan = torch.zeros(HEADER + PARTS * N, dtype=torch.long)
    plan[:len(header)] = torch.tensor(header, dtype=torch.long)
    for i, part in enumerate((ids, starts, take, mask)):
        if part is not None:
            plan[HEADER + i * N:HEADER + i * N + part.numel()] = part.reshape(-1).cpu()
    _broadcast(plan, tp)


def _broadcast(t: torch.Tensor, tp: TensorParallel) -> None:
    COUNTS["broadcast"] += 1
    BYTES["broadcast"] += t.numel() * t.element_size()
    src = dist.get_global_rank(tp.control, 0) if tp.control is not None else 0
    dist.broadcast(t, src=src, group=tp.control)


@contextlib.contextmanager
def _whole_step():
    """Ctrl-C during a step takes effect after it: a step left halfway would leave the other ranks
    waiting in its collectives."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):  # what it would have done (Python's default raises KeyboardInterrupt)
            previous(signal.SIGINT, None)
        elif caught and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class LeaderEngine(Engine):
    """Rank 0's Engine: every step and cache change is broadcast as a plan before it runs here. Each
    rank keeps its own snapshots of its own KV heads and layers (prefix caching) under the keys rank 0
    gives them; rank 0's prefix cache decides what is kept, reused and evicted for all."""

    def __init__(self, tp: TensorParallel, model: TextModel, rows: int, max_len: int,
                 prefill_chunk: int | None = None, kv_dtype=None, kv_read_dtype: torch.dtype | None = None):
        super().__init__(model, rows, max_len, prefill_chunk, kv_dtype, kv_read_dtype, **_cache_shape(model, tp))
        if max(self.prefill_chunk, rows) > tp.step_tokens:
            raise ValueError(f"a step of up to {max(self.prefill_chunk, rows)} tokens exceeds the plan's "
                             f"{tp.step_tokens} (TensorParallel.step_tokens)")
        self.tp = tp
        self._keys: dict[int, int] = {}  # id of a snapshot held by the prefix cache -> its key on every rank
        self._next_key = 0
        read = self.cache.k[0].dtype  # the dtype attention reads entries in
        self._run(_send, tp, [ENGINE, rows, max_len, _DTYPES.index(self.cache.dtype), _DTYPES.index(read)])

    def _run(self, fn, *args):
        """Run a step's collectives. Any failure leaves the group unusable (the other ranks would wait
        in a collective this rank never reaches): it becomes GroupFailed."""
        try:
            with _whole_step():
                return fn(*args)
        except Exception as e:
            raise GroupFailed(_failure(self.tp, e)) from e

    def _step(self, ids_BT, pos_BT, rows, take, image_mask_BT=None, image_features=None):
        B, T = ids_BT.shape
        starts = pos_BT[:, 0]
        # The plan sends one start per row: the engine's steps are consecutive positions per row.
        if not torch.equal(pos_BT, starts[:, None] + torch.arange(T, device=pos_BT.device)):
            raise ValueError("a tensor-parallel step takes consecutive positions in each row")
        n = 0 if image_mask_BT is None else image_features.shape[0]

        def step():
            _send(self.tp, [FORWARD, rows.start, B, T, take.numel(), n], ids_BT, starts, take,
                  None if image_mask_BT is None else image_mask_BT.long())
            if n:  # encoded here only: the other ranks get the features
                _broadcast(image_features.float().cpu().contiguous(), self.tp)
            return Engine._step(self, ids_BT, pos_BT, rows, take, image_mask_BT, image_features)
        return self._run(step)

    def move_row(self, src: int, dst: int) -> None:
        self._run(_send, self.tp, [MOVE, src, dst, self.cache.lengths[src]])
        super().move_row(src, dst)

    def snapshot(self, row, n, shared=None):
        key, self._next_key = self._next_key, self._next_key + 1
        other, s = (self._keys[id(shared[0])], shared[1]) if shared is not None else (-1, 0)
        self._run(_send, self.tp, [SAVE, row, n, key, other, s])
        snap = super().snapshot(row, n, shared)
        self._keys[id(snap)] = key
        return snap

    def restore(self, row, snap, r):
        self._run(_send, self.tp, [RESTORE, row, self._keys[id(snap)], r])
        super().restore(row, snap, r)

    def forget(self, snap):
        self._run(_send, self.tp, [FORGET, self._keys.pop(id(snap))])


def _cache_shape(model: TextModel, tp: TensorParallel) -> dict:
    """A rank caches its own KV heads of its stage's layers."""
    return {"kv_heads": model.cfg.n_kv_heads // tp.size, "layers": tp.layers(model.cfg.n_layers)}


def leader_engine(tp: TensorParallel):
    """What `LLM.engine` becomes on rank 0: makes a `LeaderEngine` with the Engine's arguments."""
    return lambda *args, **kw: LeaderEngine(tp, *args, **kw)


def stop(tp: TensorParallel) -> None:
    """Rank 0: release the followers (`follow` returns). Raises GroupFailed where one is gone."""
    try:
        _send(tp, [STOP])
    except Exception as e:
        raise GroupFailed(_failure(tp, e)) from e


def _failure(tp: TensorParallel, e: Exception) -> str:
    if isinstance(e, dist.DistError) or any(word in str(e).lower() for word in ("gloo", "nccl", "connection")):
        return f"the tensor-parallel group failed: {describe_gone(tp)} ({type(e).__name__}: {e})"
    return f"rank 0 failed in a step, which leaves the tensor-parallel group unusable: {type(e).__name__}: {e}"


@torch.inference_mode()
def follow(model: TextModel, tp: TensorParallel) -> int:
    """Ranks 1..T-1: run every step rank 0 plans, on this rank's shard, until STOP; returns the
    number of forward steps run. An error is left in the group's store for rank 0 to report."""
    _register(tp)
    try:
        return _follow(model, tp)
    except BaseException as e:
        _note(tp, f"raised {type(e).__name__}: {e}")
        raise


def _follow(model: TextModel, tp: TensorParallel) -> int:
    N, steps = tp.step_tokens, 0
    plan = torch.zeros(HEADER + PARTS * N, dtype=torch.long)
    engine = None
    snapshots = {}  # key -> this rank's part of a snapshot rank 0's prefix cache holds
    device = model.tok_embeddings.weight.device
    while True:
        _broadcast(plan, tp)
        kind, a, b, c, d, n = plan[:6].tolist()
        if kind == STOP:
            return steps
        if kind == ENGINE:
            engine = Engine(model, a, b, kv_dtype=_DTYPES[c], kv_read_dtype=_DTYPES[d], **_cache_shape(model, tp))
        elif kind == MOVE:
            engine.cache.lengths[a] = c
            engine.move_row(a, b)
        elif kind == SAVE:
            snapshots[c] = engine.snapshot(a, b, (snapshots[d], n) if d >= 0 else None)
        elif kind == RESTORE:
            engine.restore(a, snapshots[b], c)
        elif kind == FORGET:
            del snapshots[a]
        elif kind == FORWARD:
            B, T = b, c
            ids = plan[HEADER:HEADER + B * T].view(B, T).to(device)
            starts = plan[HEADER + N:HEADER + N + B].to(device)
            take = plan[HEADER + 2 * N:HEADER + 2 * N + d].to(device)
            mask = feats = None
            if n:
                mask = plan[HEADER + 3 * N:HEADER + 3 * N + B * T].view(B, T).bool().to(device)
                feats = torch.empty(n, model.cfg.dim)
                _broadcast(feats, tp)
                feats = feats.to(device, model.tok_embeddings.weight.dtype)
            engine._step(ids, starts[:, None] + torch.arange(T, device=device), slice(a, a + B), take, mask, feats)
            steps += 1
        else:
            raise RuntimeError(f"unknown plan kind {kind}")


# Where a follower is: each leaves "host pid" in the group's store at start, and a note when it raises.
_KEY = "herd/tp/{}"


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _register(tp: TensorParallel) -> None:
    store = _store()
    if store is not None:
        store.set(_KEY.format(tp.rank), f"{socket.gethostname()} {os.getpid()}")


def _note(tp: TensorParallel, text: str) -> None:
    store = _store()
    with contextlib.suppress(Exception):  # the store may be gone with the group
        store.set(_KEY.format(tp.rank) + "/note", text)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def describe_gone(tp: TensorParallel, wait_s: float = 3.0) -> str:
    """Which followers are gone and how, as far as this host can tell: a note a follower left when it
    raised, or a process of this host that no longer runs (killed: SIGKILL, out of memory)."""
    store = _store()
    if store is None:
        return "a rank is gone"
    deadline = time.monotonic() + wait_s
    while True:
        gone = []
        for r in range(1, tp.size):
            key = _KEY.format(r)
            with contextlib.suppress(Exception):
                if store.check([key + "/note"]):
                    gone.append(f"rank {r} {store.get(key + '/note').decode()}")
                elif store.check([key]):
                    host, pid = store.get(key).decode().split()
                    if host == socket.gethostname() and not _alive(int(pid)):
                        gone.append(f"rank {r} (pid {pid}) exited")
        if gone or time.monotonic() > deadline:
            return "; ".join(gone) or "a rank is gone (on another host, or it did not say why)"
        time.sleep(0.2)


# The model's collectives wait this long for a rank (a step's work is the same on every rank); the
# plans' group waits as long as the server idles.
STEP_TIMEOUT_S = float(os.environ.get("HERD_TP_TIMEOUT", "300"))
IDLE_TIMEOUT = datetime.timedelta(days=365)


def init(tp_size: int, device: str = "cpu", step_tokens: int | None = None, dtype=torch.float32,
         pp_size: int = 1) -> TensorParallel:
    """Join the group torchrun started (WORLD_SIZE must equal ``tp_size`` x ``pp_size``): NCCL for CUDA
    weights, gloo on the CPU, and a gloo group for the plans. Global rank r is tensor-parallel rank
    r % T of pipeline stage r // T. ``step_tokens`` defaults to the prefill segment."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp_size * pp_size:
        flags = f"--tp {tp_size}" + (f" --pp {pp_size}" if pp_size > 1 else "")
        raise ValueError(f"{flags} needs {tp_size * pp_size} processes: run under "
                         f"torchrun --nproc-per-node {tp_size * pp_size} (WORLD_SIZE is {world})")
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=STEP_TIMEOUT_S))
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    # Every rank creates every group, in the same order (torch.distributed's rule).
    stages = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)] \
        if pp_size > 1 else [None]
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    steps = step_tokens or default_prefill_chunk(dtype, torch.device(device))
    return TensorParallel(rank % tp_size, tp_size, stages[rank // tp_size], control, steps, rank // tp_size, pp_size)


def load(path_or_preset, tp_size: int, device: str = "cpu", pp_size: int = 1, expert_parallel: bool = False,
         **load_options):
    """`herd.load` on every rank of a torchrun group, keeping this rank's part: its tensor-parallel
    shard (each rank reads only its own parts of the checkpoint's tensors, `tensor.parts`) of its
    pipeline stage's layers. Returns (llm, tp). On rank 0 the LLM generates as usual (its engine
    broadcasts each step); the others call `follow(llm.model, tp)`. ``expert_parallel``: each rank
    holds E/T whole routed experts (`TensorParallel.expert_parallel`). Only rank 0 loads the vision
    encoder."""
    from herd.bundled import model_folder
    from herd.checkpoint.load import read_config
    from herd.config import PRESETS
    from herd.distributed import pipeline
    from herd.llm import load as load_llm, resolve_dtype

    name = os.fspath(path_or_preset)
    is_preset = name in PRESETS and not os.path.exists(name)
    cfg = (PRESETS[name] if is_preset else read_config(model_folder(name))[0]).text
    check_sizes(cfg, tp_size, pp_size, expert_parallel)  # before loading
    tp = init(tp_size, device, dtype=resolve_dtype(load_options.get("dtype", "float32")), pp_size=pp_size)
    tp = dataclasses.replace(tp, expert_parallel=expert_parallel)
    if torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    if not tp.leader:  # images are encoded on rank 0, which sends their features with the plan
        load_options.update(progress=False, vision=False)
    # Each rank reads its part of its stage's layers only (the model is split on the meta device first).
    llm = load_llm(path_or_preset, device=device, shard=lambda model: pipeline.stage_parts(model, tp), **load_options)
    llm.engine = leader_engine(tp)
    return llm, tp
