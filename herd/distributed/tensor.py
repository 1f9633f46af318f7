"""Tensor parallelism for inference: one rank's shard of a loaded text decoder, applied from outside.

`shard(model, tp)` slices every weight in place, keeping rank r's part of T, and swaps two classes
(`Block` -> `TPBlock`, `TextModel` -> `TPTextModel`); the model code stays single-device:

- attention by whole heads: rank r keeps KV heads [r G/T, (r+1) G/T) and the query heads that read
  them (query head h reads KV head h // (H/G), so they are heads [r H/T, (r+1) H/T)); wq, wk, wv
  keep those rows, wo those columns (row-parallel). RoPE, QK-norm, temperature tuning and the
  chunked mask are per head or per position: nothing to communicate;
- dense FFN and shared expert: w1, w3 keep F/T rows, w2 the same F/T columns;
- routed experts: every expert keeps F/T of its width the same way; or, with ``expert_parallel``,
  rank r keeps experts [r E/T, (r+1) E/T) whole and runs only the (token, expert) pairs routed to
  them (`LocalExperts`; pairs routed elsewhere contribute 0). Either way the router is replicated,
  so every rank routes every token alike (its input is the all-reduced, identical hidden state);
- a block's attention output and its FFN output (routed + shared summed locally) are partial sums
  over ranks: `TPBlock` all-reduces each once, 2 all-reduces per layer per step, nothing else;
- embedding and final norm replicated; the head vocab-parallel (ceil(V/T) rows a rank, the last
  padded with zeros), its float32 logits gathered to rank 0 only (other ranks get None).

`parts` is the one table of which part of each parameter a rank keeps: `shard` narrows a loaded
model by it, and the slice-reading loader (herd.checkpoint.load) reads just those parts.

Plain local tensors and explicit `torch.distributed` calls, no DTensor and no autograd: every
collective is one line here, counted in `COUNTS` and `BYTES` (tests check the sequence per step).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from herd.config import TextConfig
from herd.kernels import quant
from herd.model.layers import Linear
from herd.model.moe import MoE
from herd.model.transformer import Block, TextModel

# Collectives issued by this process, by kind ("all_reduce", "gather", "broadcast"), and the bytes of
# the tensors this process hands them (its own part for a gather; the wire traffic depends on the backend).
COUNTS: Counter[str] = Counter()
BYTES: Counter[str] = Counter()


@dataclass(frozen=True)
class TensorParallel:
    """This process's place: rank of size in its tensor-parallel group, which is pipeline stage
    ``stage`` of ``stages`` (global rank stage * size + rank). ``group`` carries the model's
    collectives (gloo on CPU, NCCL on GPUs), ``control`` the step plans (always gloo, on the CPU, over
    every rank); ``step_tokens``: the most tokens one step may carry (the plan's fixed size);
    ``expert_parallel``: each rank holds whole routed experts (E/T of them) instead of a slice of
    every expert."""

    rank: int
    size: int
    group: Any = None
    control: Any = None
    step_tokens: int = 512
    stage: int = 0
    stages: int = 1
    expert_parallel: bool = False

    @property
    def leader(self) -> bool:
        """Global rank 0: it schedules, samples and talks to users."""
        return self.rank == 0 and self.stage == 0

    def layers(self, n_layers: int) -> range:
        """This stage's contiguous share of ``n_layers`` layers."""
        return range(self.stage * n_layers // self.stages, (self.stage + 1) * n_layers // self.stages)

    def global_rank(self, stage: int, rank: int | None = None) -> int:
        """The global rank of tensor-parallel rank ``rank`` (default this one's) of stage ``stage``."""
        return stage * self.size + (self.rank if rank is None else rank)


def all_reduce(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum ``t`` over the group, in place; returns it."""
    COUNTS["all_reduce"] += 1
    BYTES["all_reduce"] += t.numel() * t.element_size()
    dist.all_reduce(t, group=tp.group)
    return t


def gather_columns(t_NV: torch.Tensor, tp: TensorParallel, width: int) -> torch.Tensor | None:
    """Every rank's [N, V/T] side by side on the group's rank 0, cut to ``width`` columns; None on the
    other ranks."""
    COUNTS["gather"] += 1
    t_NV = t_NV.contiguous()
    BYTES["gather"] += t_NV.numel() * t_NV.element_size()
    first = tp.rank == 0
    parts = [torch.empty_like(t_NV) for _ in range(tp.size)] if first else None
    dist.gather(t_NV, parts, dst=dist.get_global_rank(tp.group, 0) if tp.group is not None else 0, group=tp.group)
    return torch.cat(parts, dim=-1)[..., :width] if first else None


def check_sizes(cfg: TextConfig, size: int, stages: int = 1, expert_parallel: bool = False) -> None:
    """Refuse, naming the field, a model that cannot be split over ``size`` ranks by whole heads (and,
    with ``expert_parallel``, by whole experts), or into ``stages`` pipeline stages of whole layers."""
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"the pipeline-parallel size must be an integer >= 1, got {stages!r}")
    if stages > cfg.n_layers:
        raise ValueError(f"pipeline-parallel size {stages} exceeds n_layers ({cfg.n_layers}): each stage needs "
                         "at least one layer")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"the tensor-parallel size must be an integer >= 1, got {size!r}")
    if size > cfg.n_kv_heads:
        raise ValueError(f"tensor-parallel size {size} exceeds n_kv_heads ({cfg.n_kv_heads}): attention is split by "
                         f"whole KV heads, so at most {cfg.n_kv_heads} ranks")
    checks = [("n_kv_heads", cfg.n_kv_heads), ("n_heads", cfg.n_heads), ("ffn_dim", cfg.ffn_dim)]
    if cfg.moe is not None:
        checks.append(("moe.expert_dim", cfg.moe.expert_dim))  # the shared expert is split by width either way
    for name, value in checks:
        if value % size:
            raise ValueError(f"{name} ({value}) is not divisible by the tensor-parallel size {size}")
    if expert_parallel and cfg.moe is not None and cfg.moe.num_experts % size:
        raise ValueError(f"moe.num_experts ({cfg.moe.num_experts}) is not divisible by the expert-parallel size "
                         f"{size}: each rank holds E/T whole experts")


class Part(NamedTuple):
    """The part of one full tensor a rank keeps: ``full.narrow(dim, start, length)``, then zeros up to
    ``size`` along ``dim`` (only the output head's last part is padded)."""

    dim: int
    start: int
    length: int
    size: int


def parts(cfg: TextConfig, tp: TensorParallel) -> dict[str, Part]:
    """Parameter name -> the part rank ``tp.rank`` keeps, for every split parameter of a TextModel;
    the parameters not named are replicated. `shard` and the slice-reading loader both follow it."""
    table: dict[str, Part] = {}

    def split(name: str, n: int, dim: int) -> None:  # rank r's r-th of T equal parts
        k = n // tp.size
        table[name] = Part(dim, tp.rank * k, k, k)

    def swiglu(prefix: str, width: int) -> None:
        split(prefix + "w1.weight", width, 0)  # (F/T, D): column-parallel
        split(prefix + "w3.weight", width, 0)
        split(prefix + "w2.weight", width, 1)  # (D, F/T): row-parallel, a partial sum

    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
        # Whole heads: rows h*Dh .. (h+1)*Dh-1 belong to head h; wo takes the same heads' columns.
        for name, n, dim in (("wq", q, 0), ("wk", kv, 0), ("wv", kv, 0), ("wo", q, 1)):
            split(f"{a}{name}.weight", n, dim)
        if not cfg.is_moe[i]:
            swiglu(f, cfg.ffn_dim)
            continue
        swiglu(f + "shared_expert.", cfg.moe.expert_dim)
        for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):  # [E, F, D], [E, D, F]
            if tp.expert_parallel:
                split(f"{f}experts.{name}", cfg.moe.num_experts, 0)  # whole experts
            else:
                split(f"{f}experts.{name}", cfg.moe.expert_dim, dim)  # F/T of every expert
    V = cfg.vocab_size
    rows = -(-V // tp.size)  # vocabulary-parallel head: ceil(V/T) rows a rank, the last zero-padded
    start = min(tp.rank * rows, V)
    table["output.weight"] = Part(0, start, min(rows, V - start), rows)
    return table


def take(t: torch.Tensor, part: Part) -> torch.Tensor:
    """``part`` of the full tensor ``t``, as its own contiguous (row-major) tensor."""
    piece = t.narrow(part.dim, part.start, part.length)
    if part.length == part.size:
        return piece.contiguous()
    shape = list(t.shape)
    shape[part.dim] = part.size
    out = t.new_zeros(shape)
    out.narrow(part.dim, 0, part.length).copy_(piece)
    return out


class LocalExperts:
    """The routed part of a MoE layer on a rank that holds whole experts [first, first + n) (set as
    `MoE.parallel`): the (token, expert) pairs routed to them run through `MoE.routed` as usual, with
    the kernels' fast paths; pairs routed to another rank's experts contribute 0 here, so the block's
    all-reduce sums each pair once. A rank none of whose experts got a token computes nothing, and
    still reaches the all-reduce."""

    def __init__(self, first: int, n: int):
        self.first, self.n = first, n

    def __call__(self, moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        local_NK = ids_NK - self.first
        token_P, k_P = ((local_NK >= 0) & (local_NK < self.n)).nonzero(as_tuple=True)  # a host sync, as dispatch's
        out_ND = torch.zeros_like(x_ND)
        if token_P.numel():  # each of our pairs as a token of its own, top-1 on its local expert
            y_PD = moe.routed(x_ND[token_P], local_NK[token_P, k_P, None], scores_NK[token_P, k_P, None])
            out_ND.index_add_(0, token_P, y_PD.to(out_ND.dtype))
        return out_ND


class TPBlock(Block):
    """A block whose attention and FFN give partial sums: one all-reduce after each."""

    tp: TensorParallel

    def forward(self, x_BTD, positions, rot, packed=None):
        h = x_BTD + all_reduce(self.attention(self.attention_norm(x_BTD), positions, rot, packed), self.tp)
        return h + all_reduce(self.feed_forward(self.ffn_norm(h)), self.tp)

    def forward_cached(self, x_BTD, pos_BT, rot, k_cache, v_cache, at):
        attn = self.attention.forward_cached(self.attention_norm(x_BTD), pos_BT, rot, k_cache, v_cache, at)
        h = x_BTD + all_reduce(attn, self.tp)
        return h + all_reduce(self.feed_forward(self.ffn_norm(h)), self.tp)


class TPTextModel(TextModel):
    """A text decoder whose head holds ceil(V/T) vocabulary rows: logits gathered to rank 0."""

    tp: TensorParallel

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [..., V] on rank 0, None on the others (each computed its slice)."""
        if self.tp.size == 1:  # a pipeline stage without tensor parallelism (herd.distributed.pipeline)
            return super().head(h_BTD)
        return gather_columns(self.output(self.norm(h_BTD)).float(), self.tp, self.cfg.vocab_size)


def shard(model: TextModel, tp: TensorParallel) -> TextModel:
    """Keep rank ``tp.rank``'s part (`parts`) of every weight of a float ``model`` (in place; returns it).

    On a loaded model the rest is freed as the slices replace the full tensors; on a model built on the
    meta device it gives the shard's shapes, which the slice-reading loader then fills.
    """
    check_sizes(model.cfg, tp.size, expert_parallel=tp.expert_parallel)
    for name, m in model.named_modules():
        if isinstance(m, (Linear, quant.QuantLinear)) and m.adapter is not None:
            raise ValueError(f"{name} carries an adapter: merge adapters before sharding")
    table = parts(model.cfg, tp)
    for name, p in model.named_parameters():
        if name in table:
            p.data = take(p.data, table[name])  # row-major, whatever the layout was (the head's)
    for name, m in model.named_modules():  # quantized weights: the same integers and scales, cut
        projs = ("w1", "w3", "w2") if isinstance(m, quant.QuantExperts) else \
            (None,) if isinstance(m, quant.QuantLinear) else ()
        for proj in projs:
            key = f"{name}.{proj or 'weight'}"
            if key in table:
                quant.narrow(m, proj, *table[key])
    for block in model.layers:
        block.attention.n_heads //= tp.size
        block.attention.n_kv_heads //= tp.size
        ff = block.feed_forward
        if isinstance(ff, MoE):
            n = ff.experts.num_experts  # after the split: E/T with expert parallelism
            ff.parallel = LocalExperts(tp.rank * n, n) if tp.expert_parallel else None
        block.__class__ = TPBlock
        block.tp = tp
    for m in model.modules():
        if isinstance(m, Linear):  # a module's sizes follow its slice (quant.install reads them)
            m.out_features, m.in_features = m.weight.shape
    model.__class__ = TPTextModel
    model.tp = tp
    return model


def shard_parts(model: TextModel, tp: TensorParallel) -> dict[str, Part]:
    """`shard` the model (in place; built on the meta device, it takes the shard's shapes) and return
    the `parts` it kept: what the slice-reading loader reads of each tensor."""
    shard(model, tp)
    return parts(model.cfg, tp)
