"""Tensor parallelism for inference: one rank's shard of a loaded text decoder, applied from outside.

`shard(model, tp)` slices every weight in place, keeping rank r's part of T, and swaps two classes
(`Block` -> `TPBlock`, `TextModel` -> `TPTextModel`); the model code stays single-device:

- attention by whole heads: rank r keeps KV heads [r G/T, (r+1) G/T) and the query heads that read
  them (query head h reads KV head h // (H/G), so they are heads [r H/T, (r+1) H/T)); wq, wk, wv
  keep those rows, wo those columns (row-parallel). RoPE, QK-norm, temperature tuning and the
  chunked mask are per head or per position: nothing to communicate;
- dense FFN and shared expert: w1, w3 keep F/T rows, w2 the same F/T columns;
- routed experts: every expert keeps F/T of its width the same way; the router is replicated, so
  every rank routes every token alike (its input is the all-reduced, identical hidden state);
- a block's attention output and its FFN output (routed + shared summed locally) are partial sums
  over ranks: `TPBlock` all-reduces each once, 2 all-reduces per layer per step, nothing else;
- embedding and final norm replicated; the head vocab-parallel (ceil(V/T) rows a rank, the last
  padded with zeros), its float32 logits gathered to rank 0 only (other ranks get None).

Plain local tensors and explicit `torch.distributed` calls, no DTensor and no autograd: every
collective is one line here, counted in `COUNTS` and `BYTES` (tests check the sequence per step).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from herd.config import TextConfig
from herd.model.layers import Linear, SwiGLU
from herd.model.moe import Experts, MoE
from herd.model.transformer import Block, TextModel

# Collectives issued by this process, by kind ("all_reduce", "gather", "broadcast"), and the bytes of
# the tensors this process hands them (its own part for a gather; the wire traffic depends on the backend).
COUNTS: Counter[str] = Counter()
BYTES: Counter[str] = Counter()


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: rank of size; ``group`` carries the model's
    collectives (gloo on CPU, NCCL on GPUs), ``control`` the step plans (always gloo, on the CPU);
    ``step_tokens``: the most tokens one step may carry (the plan's fixed size)."""

    rank: int
    size: int
    group: Any = None
    control: Any = None
    step_tokens: int = 512

    @property
    def leader(self) -> bool:
        return self.rank == 0


def all_reduce(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum ``t`` over the group, in place; returns it."""
    COUNTS["all_reduce"] += 1
    BYTES["all_reduce"] += t.numel() * t.element_size()
    dist.all_reduce(t, group=tp.group)
    return t


def gather_columns(t_NV: torch.Tensor, tp: TensorParallel, width: int) -> torch.Tensor | None:
    """Every rank's [N, V/T] side by side on rank 0, cut to ``width`` columns; None on other ranks."""
    COUNTS["gather"] += 1
    t_NV = t_NV.contiguous()
    BYTES["gather"] += t_NV.numel() * t_NV.element_size()
    parts = [torch.empty_like(t_NV) for _ in range(tp.size)] if tp.leader else None
    dist.gather(t_NV, parts, dst=dist.get_global_rank(tp.group, 0) if tp.group is not None else 0, group=tp.group)
    return torch.cat(parts, dim=-1)[..., :width] if tp.leader else None


def check_sizes(cfg: TextConfig, size: int) -> None:
    """Refuse, naming the field, a model that cannot be split over ``size`` ranks by whole heads."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"the tensor-parallel size must be an integer >= 1, got {size!r}")
    if size > cfg.n_kv_heads:
        raise ValueError(f"tensor-parallel size {size} exceeds n_kv_heads ({cfg.n_kv_heads}): attention is split by "
                         f"whole KV heads, so at most {cfg.n_kv_heads} ranks")
    checks = [("n_kv_heads", cfg.n_kv_heads), ("n_heads", cfg.n_heads), ("ffn_dim", cfg.ffn_dim)]
    if cfg.moe is not None:
        checks.append(("moe.expert_dim", cfg.moe.expert_dim))
    for name, value in checks:
        if value % size:
            raise ValueError(f"{name} ({value}) is not divisible by the tensor-parallel size {size}")


def _part(t: torch.Tensor, dim: int, tp: TensorParallel) -> torch.Tensor:
    """Rank r's r-th of T equal parts of ``t`` along ``dim``, as its own contiguous tensor."""
    n = t.shape[dim] // tp.size
    return t.narrow(dim, tp.rank * n, n).contiguous()


def _keep(p: nn.Parameter, dim: int, tp: TensorParallel) -> None:
    p.data = _part(p.data, dim, tp)


def _shard_swiglu(ffn: SwiGLU, tp: TensorParallel) -> None:
    _keep(ffn.w1.weight, 0, tp)  # (F/T, D): column-parallel
    _keep(ffn.w3.weight, 0, tp)
    _keep(ffn.w2.weight, 1, tp)  # (D, F/T): row-parallel, a partial sum


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
        return gather_columns(self.output(self.norm(h_BTD)).float(), self.tp, self.cfg.vocab_size)


def shard(model: TextModel, tp: TensorParallel) -> TextModel:
    """Keep rank ``tp.rank``'s part of every weight of a loaded float ``model`` (in place; returns it).

    Each rank loads the whole checkpoint and keeps its slices; the rest is freed as the slices replace
    the full tensors.
    """
    check_sizes(model.cfg, tp.size)
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.adapter is not None:
            raise ValueError(f"{name} carries an adapter: merge adapters before sharding")
        if isinstance(m, Experts) and not m.w1.is_floating_point():
            raise ValueError("quantized experts cannot be sharded yet: load in a float dtype")
    for block in model.layers:
        a = block.attention
        for lin in (a.wq, a.wk, a.wv):
            _keep(lin.weight, 0, tp)  # whole heads: rows h*Dh .. (h+1)*Dh-1 belong to head h
        _keep(a.wo.weight, 1, tp)
        a.n_heads //= tp.size
        a.n_kv_heads //= tp.size
        ff = block.feed_forward
        if isinstance(ff, MoE):
            ff.parallel = None
            _keep(ff.experts.w1, 1, tp)  # (E, F/T, D)
            _keep(ff.experts.w3, 1, tp)
            _keep(ff.experts.w2, 2, tp)  # (E, D, F/T)
            _shard_swiglu(ff.shared_expert, tp)
        else:
            _shard_swiglu(ff, tp)
        block.__class__ = TPBlock
        block.tp = tp
    w = model.output.weight
    V = w.shape[0]
    rows = -(-V // tp.size)
    padded = torch.cat([w.data, w.data.new_zeros(rows * tp.size - V, w.shape[1])]) if rows * tp.size != V else w.data
    w.data = padded[tp.rank * rows:(tp.rank + 1) * rows].contiguous()  # row-major, whatever the head's layout was
    model.output.out_features = rows
    model.__class__ = TPTextModel
    model.tp = tp
    return model
