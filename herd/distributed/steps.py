"""One step plan for every rank of a tensor-parallel group: rank 0 decides, the others follow.

Rank 0 runs the ordinary generation loop (tokenizer, Batcher, sampling, printing) over a
`LeaderEngine`. Before each model call (`Engine._step`) and each cache change it broadcasts the plan:
one fixed-size int64 tensor over the gloo ``control`` group. The other ranks sit in `follow`, read
each plan and make the same call on their own shard and KV cache, so every rank issues the same
collectives in the same order: per forward step, one broadcast, 2 all-reduces per layer, and one
gather when the step takes logits. Which collectives run depends on the plan only, never on the data
(a rank whose experts got no tokens still reaches the same all-reduces).

Plan layout (N = ``tp.step_tokens``): 8 header ints, then N token ids, N row start positions, N
taken token indices. Kinds:
  ENGINE  rows, max_len, KV dtype, read dtype        a new Engine (a new KV cache)
  FORWARD first row, B, T, n taken                   `Engine._step`; positions start[b] + t
  MOVE    src, dst, entries                          `Engine.move_row`
  STOP                                               `follow` returns
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from herd.distributed.tensor import BYTES, COUNTS, TensorParallel, check_sizes, shard
from herd.engine.cache import KV_DTYPES
from herd.engine.generate import Engine, default_prefill_chunk
from herd.model.transformer import TextModel

ENGINE, FORWARD, MOVE, STOP = 1, 2, 3, 4
HEADER = 8
_DTYPES = list(KV_DTYPES.values())  # a dtype travels as its index here


def _send(tp: TensorParallel, header: list[int], ids=None, starts=None, take=None) -> None:
    N = tp.step_tokens
    plan = torch.zeros(HEADER + 3 * N, dtype=torch.long)
    plan[:len(header)] = torch.tensor(header, dtype=torch.long)
    for i, part in enumerate((ids, starts, take)):
        if part is not None:
            plan[HEADER + i * N:HEADER + i * N + part.numel()] = part.reshape(-1).cpu()
    _broadcast(plan, tp)


def _broadcast(plan: torch.Tensor, tp: TensorParallel) -> None:
    COUNTS["broadcast"] += 1
    BYTES["broadcast"] += plan.numel() * plan.element_size()
    src = dist.get_global_rank(tp.control, 0) if tp.control is not None else 0
    dist.broadcast(plan, src=src, group=tp.control)


class LeaderEngine(Engine):
    """Rank 0's Engine: every step and cache change is broadcast as a plan before it runs here."""

    def __init__(self, tp: TensorParallel, model: TextModel, rows: int, max_len: int,
                 prefill_chunk: int | None = None, kv_dtype=None, kv_read_dtype: torch.dtype | None = None):
        super().__init__(model, rows, max_len, prefill_chunk, kv_dtype, kv_read_dtype,
                         kv_heads=model.cfg.n_kv_heads // tp.size)
        if max(self.prefill_chunk, rows) > tp.step_tokens:
            raise ValueError(f"a step of up to {max(self.prefill_chunk, rows)} tokens exceeds the plan's "
                             f"{tp.step_tokens} (TensorParallel.step_tokens)")
        self.tp = tp
        read = self.cache.k[0].dtype  # the dtype attention reads entries in
        _send(tp, [ENGINE, rows, max_len, _DTYPES.index(self.cache.dtype), _DTYPES.index(read)])

    def _step(self, ids_BT, pos_BT, rows, take, image_mask_BT=None, image_features=None):
        if image_mask_BT is not None:
            raise NotImplementedError("images under tensor parallelism are not supported yet")
        B, T = ids_BT.shape
        starts = pos_BT[:, 0]
        # The plan sends one start per row: the engine's steps are consecutive positions per row.
        if not torch.equal(pos_BT, starts[:, None] + torch.arange(T, device=pos_BT.device)):
            raise ValueError("a tensor-parallel step takes consecutive positions in each row")
        _send(self.tp, [FORWARD, rows.start, B, T, take.numel()], ids_BT, starts, take)
        return super()._step(ids_BT, pos_BT, rows, take)

    def move_row(self, src: int, dst: int) -> None:
        _send(self.tp, [MOVE, src, dst, self.cache.lengths[src]])
        super().move_row(src, dst)


def leader_engine(tp: TensorParallel):
    """What `LLM.engine` becomes on rank 0: makes a `LeaderEngine` with the Engine's arguments."""
    return lambda *args, **kw: LeaderEngine(tp, *args, **kw)


def stop(tp: TensorParallel) -> None:
    """Rank 0: release the followers (`follow` returns)."""
    _send(tp, [STOP])


@torch.inference_mode()
def follow(model: TextModel, tp: TensorParallel) -> int:
    """Ranks 1..T-1: run every step rank 0 plans, on this rank's shard, until STOP; returns the
    number of forward steps run."""
    N, steps = tp.step_tokens, 0
    plan = torch.zeros(HEADER + 3 * N, dtype=torch.long)
    engine = None
    device = model.tok_embeddings.weight.device
    while True:
        _broadcast(plan, tp)
        kind, a, b, c, d = plan[:5].tolist()
        if kind == STOP:
            return steps
        if kind == ENGINE:
            engine = Engine(model, a, b, kv_dtype=_DTYPES[c], kv_read_dtype=_DTYPES[d],
                            kv_heads=model.cfg.n_kv_heads // tp.size)
        elif kind == MOVE:
            engine.cache.lengths[a] = c
            engine.move_row(a, b)
        elif kind == FORWARD:
            B, T = b, c
            ids = plan[HEADER:HEADER + B * T].view(B, T).to(device)
            starts = plan[HEADER + N:HEADER + N + B].to(device)
            take = plan[HEADER + 2 * N:HEADER + 2 * N + d].to(device)
            engine._step(ids, starts[:, None] + torch.arange(T, device=device), slice(a, a + B), take)
            steps += 1
        else:
            raise RuntimeError(f"unknown plan kind {kind}")


def init(tp_size: int, device: str = "cpu", step_tokens: int | None = None, dtype=torch.float32) -> TensorParallel:
    """Join the group torchrun started (WORLD_SIZE must equal ``tp_size``): NCCL for CUDA weights, gloo
    on the CPU, and a gloo group for the plans. ``step_tokens`` defaults to the prefill segment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp_size:
        raise ValueError(f"--tp {tp_size} needs {tp_size} processes: run under "
                         f"torchrun --nproc-per-node {tp_size} (WORLD_SIZE is {world})")
    cuda = torch.device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    control = dist.new_group(backend="gloo") if cuda else None
    steps = step_tokens or default_prefill_chunk(dtype, torch.device(device))
    return TensorParallel(rank, tp_size, None, control, steps)


def load(path_or_preset, tp_size: int, device: str = "cpu", **load_options):
    """`herd.load` on every rank of a torchrun group, then this rank's shard: (llm, tp). On rank 0 the
    LLM generates as usual (its engine broadcasts each step); the others call `follow(llm.model, tp)`.
    Every rank reads the whole checkpoint and keeps its slices (per-rank slice reading is not done yet)."""
    from herd import kernels
    from herd.bundled import model_folder
    from herd.checkpoint.load import read_config
    from herd.config import PRESETS
    from herd.llm import load as load_llm, resolve_dtype

    name = os.fspath(path_or_preset)
    is_preset = name in PRESETS and not os.path.exists(name)
    check_sizes((PRESETS[name] if is_preset else read_config(model_folder(name))[0]).text, tp_size)  # before loading
    tp = init(tp_size, device, dtype=resolve_dtype(load_options.get("dtype", "float32")))
    if torch.device(device).type == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    if not tp.leader:
        load_options["progress"] = False
    llm = load_llm(path_or_preset, device=device, **load_options)
    shard(llm.model, tp)
    if load_options.get("kernels", True):
        kernels.apply(llm.model)  # again: the head's slice is row-major; the kernels pick its layout
    llm.engine = leader_engine(tp)
    return llm, tp
