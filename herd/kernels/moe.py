"""Routed experts by device paths: one grouped GEMM per projection on CUDA (sm90+: bf16 experts, or
FP8 ones with rowwise scales), and for a handful of (token, expert) pairs (decode) each pair's expert
on its row, without sort or scatter."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from herd.kernels import quant
from herd.kernels.cpu import linear as cpu_linear
from herd.model.moe import Experts, MoE

FEW_PAIRS = 4  # (token, expert) pairs up to which decode skips the sort by expert


@functools.lru_cache(maxsize=None)
def _has_grouped_mm(device_index: int | None) -> bool:
    # Asked once per device, not in every MoE layer of every step.
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device_index) >= (9, 0)


def grouped_gemm_ok(x: torch.Tensor) -> bool:
    """torch._grouped_mm (and _scaled_grouped_mm) exist for bf16 on CUDA devices of compute capability
    9.0 and up."""
    return x.is_cuda and x.dtype == torch.bfloat16 and _has_grouped_mm(x.device.index)


def _sorted_pairs(x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor, experts: int):
    """The (token, expert) pairs sorted by expert: each pair's token, its input (scaled by its score),
    and each expert's end row (int32 offsets, as the grouped GEMMs take them)."""
    flat_ids = ids_NK.flatten()
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // ids_NK.shape[1]
    offs = torch.bincount(flat_ids, minlength=experts).cumsum(0).to(torch.int32)
    return token_of, x_ND[token_of] * scores_NK.flatten()[order, None], offs


def grouped(moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
    """The (token, expert) pairs sorted by expert, then one grouped GEMM per projection over all
    experts (per-expert row offsets). No host sync, so decode steps can be captured in a CUDA graph."""
    w = moe.experts  # (out, in) weights; transposed views are the column-major B the kernel wants
    token_of, x_in, offs = _sorted_pairs(x_ND, ids_NK, scores_NK, w.w1.shape[0])
    gate = torch._grouped_mm(x_in, w.w1.transpose(1, 2), offs=offs)
    up = torch._grouped_mm(x_in, w.w3.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(F.silu(gate) * up, w.w2.transpose(1, 2), offs=offs)
    return torch.zeros_like(x_ND).index_add_(0, token_of, y)


def grouped_fp8(moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
    """`grouped` for FP8 experts: each projection one torch._scaled_grouped_mm over the pairs' rows, each
    row quantized to float8 with its own scale as `quant.fp8_linear` does, so every pair computes what
    its expert's `QuantExperts.one` computes."""
    w = moe.experts
    token_of, x_in, offs = _sorted_pairs(x_ND, ids_NK, scores_NK, w.num_experts)

    def product(a: torch.Tensor, proj: str) -> torch.Tensor:
        aq, sa = quant.fp8_rows(a)
        return torch._scaled_grouped_mm(aq, getattr(w, f"{proj}_weight_fp8").transpose(1, 2), sa.view(-1),
                                        getattr(w, f"{proj}_weight_scale"), offs=offs, out_dtype=torch.bfloat16)

    h = F.silu(product(x_in, "w1")) * product(x_in, "w3")
    return torch.zeros_like(x_ND).index_add_(0, token_of, product(h, "w2").to(x_ND.dtype))


def few(moe: MoE, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
    """One host sync for the ids, then each pair's expert reads only its own weights."""
    if ids_NK.numel() == 1:  # batch-1 decode with top-1: one expert on one row
        return moe.experts.one(int(ids_NK), x_ND * scores_NK)
    x_in = x_ND[:, None] * scores_NK[:, :, None]  # (N, K, D): the score scales the expert input
    K = ids_NK.shape[1]
    rows = [moe.experts.one(e, x_in[i // K, i % K, None]) for i, e in enumerate(ids_NK.flatten().tolist())]
    return torch.cat(rows).view(-1, K, x_ND.shape[1]).sum(1)  # (N, D)


class FastMoE(MoE):
    def routed(self, x_ND, ids_NK, scores_NK):
        if grouped_gemm_ok(x_ND) and self.experts.adapter is None:
            if isinstance(self.experts, Experts):
                return grouped(self, x_ND, ids_NK, scores_NK)
            if getattr(self.experts, "mode", None) == "fp8" and ids_NK.numel() > FEW_PAIRS:
                return grouped_fp8(self, x_ND, ids_NK, scores_NK)
        if ids_NK.numel() <= FEW_PAIRS:
            return few(self, x_ND, ids_NK, scores_NK)
        return super().routed(x_ND, ids_NK, scores_NK)


class CPUExperts(Experts):
    product = staticmethod(cpu_linear)
