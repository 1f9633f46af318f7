"""Scale-out from outside the model: FSDP2 (`fully_shard`) for data parallelism and sharding, and
expert parallelism for MoE layers, on any torch.distributed backend (gloo on CPU, NCCL on CUDA).

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

from herd.model.moe import MoE
from herd.model.transformer import TextModel


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sums of the values over all ranks (float64 on the CPU: gloo and NCCL both take it)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(backend: str, device: str) -> World:
    """World from torchrun's environment (RANK, WORLD_SIZE, ...), or a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.startswith("cuda") else "gloo"))
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size())


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
        m.expert_parallel = ep


def apply_fsdp(model: TextModel, vision: nn.Module | None, world: World, device: str,
               expert_parallel: bool) -> list[nn.Module]:
    """Shard every block, then the rest; experts stay out of FSDP under expert parallelism.
    Returns the FSDP-managed modules."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def gather_state(model: TextModel, world: World) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank, in the single-process layout (experts re-joined)."""
    out = {}
    ep_names = {name for name, m in model.named_modules() if isinstance(m, MoE) and m.expert_parallel is not None}
    for key, t in model.state_dict().items():
        t = full_tensor(t).detach()
        owner = key.rsplit(".experts.", 1)[0]
        if world.size > 1 and owner in ep_names and ".experts." in key:
            parts = [torch.empty_like(t) for _ in range(world.size)]
            dist.all_gather(parts, t.contiguous())
            t = torch.cat(parts)
        out[key] = t.cpu()
    return out
