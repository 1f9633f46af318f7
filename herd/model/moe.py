"""Mixture-of-experts feed-forward with Meta's exact routing semantics.

router logits = x W_router; keep the top-K logits per token; score = sigmoid(logit) for those,
0 for every other expert. The score scales the expert's *input*: out = shared(x) +
sum_k expert_k(x * score_k). `dispatch` runs each expert on just the tokens routed to it (one GEMM
chain per expert with work; herd.kernels adds device paths); `dense_reference` runs every token
through every expert like Meta's and Hugging Face's code — slow, obviously right, used to test the
others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import MoEConfig
from herd.model.layers import Linear, SwiGLU, swiglu


def dispatch(one, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The routed output of many tokens (CPU prefill, training): the N*K (token, expert) pairs
    sorted by expert so each expert's tokens are one slice; one host sync (the per-expert counts),
    then ``one(e, x)`` (expert e on its rows) for each expert that has work."""
    flat_ids = ids_NK.flatten()
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // ids_NK.shape[1]  # token index of each sorted pair
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    x_in = x_ND[token_of] * scores_NK.flatten()[order, None]  # score scales the expert *input*
    out = torch.zeros_like(x_ND)
    start = 0
    for e, n in enumerate(counts):
        if n:
            y = one(e, x_in[start:start + n])
            out.index_add_(0, token_of[start:start + n], y.to(out.dtype))  # bf16 under autocast
        start += n
    return out


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights: w1/w3 [E, F, D], w2 [E, D, F].

    Each expert's matrices are (out, in) like nn.Linear's, the transpose of Meta's [E, D, F]
    files: on CPU a GEMV over rows of a row-major (out, in) matrix streams memory in order, while
    x @ [D, F] in bfloat16 falls on a kernel ~20x slower. The loaders transpose once.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        # None, or a module set from outside (LoRA in training) whose delta(name, e, x) is added to
        # the output of projection `name` ('w1', 'w3', 'w2') of expert e.
        self.adapter: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def dims(self) -> tuple[int, int]:
        """(D, F): the model width and each expert's width."""
        return self.w1.shape[2], self.w1.shape[1]

    def one(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens [N, D] -> [N, D]; touches only expert e's weights."""
        a, linear = self.adapter, self.product
        if a is None:
            return swiglu(x_ND, self.w1[e], self.w3[e], self.w2[e], linear)
        gate = linear(x_ND, self.w1[e]) + a.delta("w1", e, x_ND)
        up = linear(x_ND, self.w3[e]) + a.delta("w3", e, x_ND)
        h = F.silu(gate) * up
        return linear(h, self.w2[e]) + a.delta("w2", e, h)

    @staticmethod
    def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T for one expert matrix (herd.kernels swaps in device kernels)."""
        return F.linear(x, w)


class MoE(nn.Module):
    def __init__(self, dim: int, moe: MoEConfig):
        super().__init__()
        self.top_k = moe.top_k
        self.router = Linear(dim, moe.num_experts, bias=False)  # weight [E, D]
        self.experts = Experts(moe.num_experts, dim, moe.expert_dim)
        self.shared_expert = SwiGLU(dim, moe.expert_dim)
        self.dense_reference = False  # True: Meta's every-token-through-every-expert oracle
        # Set from outside (herd.train.parallel) when this process holds part of the experts (expert
        # parallelism: some of them; tensor parallelism: a slice of each): a function
        # (moe, x_ND, ids_NK, scores_NK) -> routed output.
        self.parallel = None
        # In training, the last forward's router logits [N, E] and choices [N, K], for the
        # load-balancing losses and per-expert token counts (herd.train.moe_losses).
        self.router_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K expert ids [N, K] and their sigmoid scores [N, K] (top-K on raw logits)."""
        logits_NE = self.router(x_ND)
        top_NK, ids_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        if self.training:
            self.router_stats = (logits_NE, ids_NK)
        return ids_NK, torch.sigmoid(top_NK.float()).to(x_ND.dtype)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        ids_NK, scores_NK = self.route(x_ND)
        if self.parallel is not None:
            routed = self.parallel(self, x_ND, ids_NK, scores_NK)
        elif self.dense_reference:
            routed = self._dense(x_ND, ids_NK, scores_NK)
        else:
            routed = self.routed(x_ND, ids_NK, scores_NK)
        return (self.shared_expert(x_ND) + routed).view_as(x_BTD)

    def routed(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        """The routed experts' output [N, D] (herd.kernels swaps in device paths)."""
        return dispatch(self.experts.one, x_ND, ids_NK, scores_NK, self.experts.num_experts)

    def _dense(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, scores_NK: torch.Tensor) -> torch.Tensor:
        E = self.experts.w1.shape[0]
        scores_NE = torch.zeros(x_ND.shape[0], E, dtype=x_ND.dtype, device=x_ND.device)
        scores_NE.scatter_(1, ids_NK, scores_NK)  # unselected experts score 0, so their input is 0
        x_END = x_ND[None] * scores_NE.t()[:, :, None]
        w = self.experts
        t = lambda m: m.transpose(1, 2)  # noqa: E731  (out, in) -> (in, out) for x @ w
        y_END = torch.bmm(F.silu(torch.bmm(x_END, t(w.w1))) * torch.bmm(x_END, t(w.w3)), t(w.w2))
        return y_END.sum(0)
