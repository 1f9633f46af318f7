"""Scale-out from outside the model: FSDP2 (`fully_shard`) for data parallelism and sharding,
expert parallelism for MoE layers, and tensor parallelism (DTensor), on any torch.distributed
backend (gloo on CPU, NCCL on CUDA).

The processes form a (dp, tp) mesh: groups of `tp` consecutive ranks split every layer's work
(tensor parallel) and see the same data; the dp groups each see their own rows and FSDP shards
and averages over them. tp = 1 (the default) is plain FSDP (+ expert parallelism).

Tensor parallelism (Megatron-style, built from DTensor's ColwiseParallel / RowwiseParallel): wq,
wk, wv and every SwiGLU's w1/w3 are split by output rows (whole attention heads, KV heads with
their query heads), wo and w2 by input columns, so each attention and FFN costs one all-reduce of
its output. Routed experts are split the same way, by their hidden width: every rank holds a 1/tp
slice of every expert, routes all tokens (the router is replicated), and one all-reduce sums the
slices' outputs. Embeddings, norms, router, output head and the vision encoder are replicated.

Expert parallelism: with W processes, rank r keeps routed experts [r*E/W, (r+1)*E/W) of every MoE
layer. Each rank routes its own tokens, sends each (token, expert) pair to the expert's owner with
one all-to-all, the owner runs its experts on everything it received, and a second all-to-all
brings the results home (both differentiable, so the backward pass exchanges gradients the same
way). An expert's weight gradient is then complete on its owner: the expert weights are left out
of FSDP and need no reduction. Everything else is sharded by FSDP2 over all ranks.

The trainer divides every rank's summed token loss by the whole step's target count, so the *sum*
of the ranks' gradients is the gradient of the global mean loss, as on one process. FSDP averages
over ranks (gloo has no pre-scaled sum), so the loss is multiplied by W, and the expert-parallel
gradients, which nothing averages, are divided by W again after the backward pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from herd.model.layers import swiglu
from herd.model.moe import MoE, dispatch
from herd.model.transformer import TextModel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    tp: int = 1  # processes per tensor-parallel group
    mesh: object = None  # the (dp, tp) DeviceMesh when size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel group this rank is in: the groups see different rows."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.size // self.tp

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sums of the values over all ranks (float64 on the CPU: gloo and NCCL both take it)."""
        return self._sum(values, None) if self.size > 1 else list(values)

    def dp_sum(self, *values: float) -> list[float]:
        """Sums over the data-parallel groups, each counted once (the tp ranks of a group hold the
        same figures: same rows, same loss)."""
        return self._sum(values, self.mesh.get_group("dp")) if self.dp_size > 1 else list(values)

    @staticmethod
    def _sum(values, group) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, group=group)
        return t.tolist()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(backend: str, device: str, tp: int = 1) -> World:
    """World from torchrun's environment (RANK, WORLD_SIZE, ...), or a single process; ``tp``
    processes per tensor-parallel group (distributed.tensor_parallel)."""
    from torch.distributed.device_mesh import init_device_mesh
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size % tp:
        raise ValueError(f"distributed.tensor_parallel = {tp} does not divide the {size} processes")
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.startswith("cuda") else "gloo"))
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (size // tp, tp),
                            mesh_dim_names=("dp", "tp"))
    return World(dist.get_rank(), size, tp, mesh)


class ExpertParallel:
    """The routed part of one MoE layer when this rank holds experts [first, first + local)."""

    def __init__(self, world: World, num_experts: int):
        self.world, self.num_experts = world, num_experts
        self.local = num_experts // world.size
        self.first = world.rank * self.local

    def __call__(self, moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        W, El, K = self.world.size, self.local, moe.top_k
        flat = ids_NK.flatten()
        order = torch.argsort(flat, stable=True)  # pairs by global expert id: by owner, then local expert
        token_of = order // K
        x_send = x_ND[token_of] * scores_NK.flatten()[order, None]  # the score scales the expert input
        counts = torch.bincount(flat, minlength=self.num_experts)  # pairs per global expert
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts)  # got[s * El + e]: pairs rank s sends to my expert e
        send = counts.view(W, El).sum(1).tolist()
        recv_by_src = got.view(W, El)
        recv = recv_by_src.sum(1).tolist()
        x_recv = dist_fn.all_to_all_single(x_send.new_empty(sum(recv), x_ND.shape[1]), x_send, recv, send)
        # Received rows are ordered by source rank, then local expert: regroup them by local expert.
        expert_of = torch.repeat_interleave(torch.arange(El, device=x_ND.device).repeat(W), recv_by_src.flatten())
        by_expert = torch.argsort(expert_of, stable=True)
        per_expert = recv_by_src.sum(0).tolist()
        x_grouped = x_recv[by_expert]
        outs, start = [], 0
        for e, n in enumerate(per_expert):
            if n:
                outs.append(moe.experts.one(e, x_grouped[start:start + n]))
            start += n
        y_grouped = torch.cat(outs) if outs else x_grouped[:0]
        y_recv = torch.empty_like(y_grouped).index_copy(0, by_expert, y_grouped)  # back to arrival order
        y_send = dist_fn.all_to_all_single(x_send.new_empty(x_send.shape), y_recv, send, recv)
        return torch.zeros_like(x_ND).index_add(0, token_of, y_send.to(x_ND.dtype))


def expert_parameters(model: TextModel) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()]


def shard_experts(model: TextModel, world: World) -> None:
    """Keep this rank's slice of every MoE layer's routed experts (and of their adapters)."""
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        E = m.experts.w1.shape[0]
        if E % world.size:
            raise ValueError(f"expert parallelism: {E} experts do not split evenly over {world.size} processes")
        ep = ExpertParallel(world, E)
        for holder in (m.experts, m.experts.adapter):
            if holder is None:
                continue
            for name, p in list(holder.named_parameters(recurse=False)):
                part = p.detach()[ep.first:ep.first + ep.local].clone()
                setattr(holder, name, nn.Parameter(part, requires_grad=p.requires_grad))
        m.parallel = ep


def _tp_input(t: torch.Tensor, mesh) -> torch.Tensor:
    """Megatron's f: identity forward; backward, the ranks' partial gradients are summed."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _tp_output(t: torch.Tensor, mesh) -> torch.Tensor:
    """Megatron's g: forward, the ranks' partial results are summed; identity backward."""
    from torch.distributed.tensor import DTensor, Partial, Replicate
    return DTensor.from_local(t, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()


class ExpertTensorParallel:
    """The routed part of one MoE layer when this rank holds a 1/tp slice of every expert's hidden
    width (w1, w3 rows and w2 columns, DTensor shards): all tokens run through the local slices,
    and the slices' partial outputs are summed over the group."""

    def __init__(self, mesh):
        self.mesh = mesh

    def __call__(self, moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (p.to_local() for p in (moe.experts.w1, moe.experts.w3, moe.experts.w2))
        # The input and the scores enter the split region through f: their gradients from each
        # rank's slice are partial and must be summed.
        x, scores = _tp_input(x_ND, self.mesh), _tp_input(scores_NK, self.mesh)
        routed = dispatch(lambda e, xe: swiglu(xe, w1[e], w3[e], w2[e]), x, ids_NK, scores, w1.shape[0])
        return _tp_output(routed, self.mesh)


def apply_tensor_parallel(model: TextModel, world: World) -> None:
    """Split attention, dense FFNs, shared and routed experts over the tp group (see the module doc)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    tp, mesh, cfg = world.tp, world.mesh["tp"], model.cfg
    widths = {"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.n_kv_heads}
    if not all(cfg.is_moe):
        widths["model.ffn_dim"] = cfg.ffn_dim
    if any(cfg.is_moe):
        widths["moe.expert_dim"] = cfg.moe.expert_dim
    for name, n in widths.items():
        if n % tp:
            raise ValueError(f"tensor parallelism: {name} = {n} does not split evenly over "
                             f"distributed.tensor_parallel = {tp} processes")
    split_ffn = {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()}
    for block in model.layers:
        attn = block.attention
        parallelize_module(attn, mesh, {"wq": ColwiseParallel(), "wk": ColwiseParallel(), "wv": ColwiseParallel(),
                                        "wo": RowwiseParallel()})
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # the local heads
        ffn = block.feed_forward
        if isinstance(ffn, MoE):
            parallelize_module(ffn.shared_expert, mesh, split_ffn)
            ex = ffn.experts
            for name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
                setattr(ex, name, nn.Parameter(distribute_tensor(getattr(ex, name).detach(), mesh, [Shard(dim)])))
            ffn.parallel = ExpertTensorParallel(mesh)
        else:
            parallelize_module(ffn, mesh, split_ffn)


def apply_fsdp(model: TextModel, vision: nn.Module | None, world: World, device: str,
               expert_parallel: bool) -> list[nn.Module]:
    """Shard every block, then the rest, over the dp groups; experts stay out of FSDP under expert
    parallelism. Returns the FSDP-managed modules."""
    from torch.distributed.fsdp import fully_shard

    mesh = world.mesh["dp"]
    ignored = set(expert_parameters(model)) if expert_parallel else set()
    if expert_parallel:
        ignored |= {p for m in model.modules() if isinstance(m, MoE) and m.experts.adapter is not None
                    for p in m.experts.adapter.parameters()}
    units = []
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=ignored & set(block.parameters()) or None)
        units.append(block)
    if vision is not None:
        fully_shard(vision, mesh=mesh)
        units.append(vision)
    fully_shard(model, mesh=mesh, ignored_params=ignored or None)
    units.append(model)
    return units


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded DTensor (a collective: every rank calls it), or t itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def copies(t: torch.Tensor, world: World) -> int:
    """How many ranks hold this very piece of a tensor: 1 for a plain tensor (one process, or an
    expert-parallel expert), else the ranks outside its mesh times its replicated mesh dims."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return 1
    mesh = t.device_mesh
    n = world.size // mesh.size()
    for d, placement in enumerate(t.placements):
        if placement.is_replicate():
            n *= mesh.size(d)
    return n


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def gather_state(model: TextModel, world: World) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank, in the single-process layout (experts re-joined)."""
    out = {}
    ep_names = {name for name, m in model.named_modules() if isinstance(m, MoE)
                and isinstance(m.parallel, ExpertParallel)}
    for key, t in model.state_dict().items():
        t = full_tensor(t).detach()
        owner = key.rsplit(".experts.", 1)[0]
        if world.size > 1 and owner in ep_names and ".experts." in key:
            parts = [torch.empty_like(t) for _ in range(world.size)]
            dist.all_gather(parts, t.contiguous())
            t = torch.cat(parts)
        out[key] = t.cpu()
    return out
