"""Cached attention by the fastest kernel for the device: one query per row written out as two
matmuls (a CPU over many keys in float32, a GPU), and on CUDA torch's fused kernels minus cuDNN's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from herd.kernels import native
from herd.model.attention import Attention

# Not cuDNN's kernel: it builds a plan for every new shape (~6 ms on an H100), and a cache's key
# length changes with every segment.
CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row: q (B, H, 1, Dh), k/v (B, G, L, Dh), mask (B, 1, 1, L) or None -> (B, H, 1, Dh).

    scaled_dot_product_attention's math (scale 1/sqrt(Dh), softmax in float32) with the H query heads
    of each KV group as the rows of one matmul and no KV repeat; the fused CPU kernel is slower for
    one query over many keys.
    """
    B, H, _, Dh = q.shape
    G = k.shape[1]
    q = q.view(B, G, H // G, Dh)  # query heads grouped by their KV head
    scores = (q @ k.transpose(2, 3)).float() * Dh ** -0.5  # (B, G, H/G, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, L) broadcasts over G, H/G
    out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (B, G, H/G, Dh)
    return out.reshape(B, H, 1, Dh)


def takes_attend_one(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Where `attend_one` beats the fused kernel: a GPU, or a CPU past 1024 keys in all over a float32
    cache. Never over a half-precision CPU cache: q @ k.T would round its scores to bf16, where the
    fused kernel keeps them in float32 as transformers' attention does."""
    if q.shape[2] != 1:
        return False
    return q.device.type != "cpu" or (q.shape[0] * keys.shape[2] > 1024 and keys.dtype == torch.float32)


class FastAttention(Attention):
    def head_norm(self, x):
        y = native.rms_norm(x, None, self.norm_eps)
        return super().head_norm(x) if y is None else y

    def attend_cached(self, q, keys, values, mask):
        if takes_attend_one(q, keys):
            return attend_one(q, keys, values, mask)
        if q.device.type == "cuda":
            with sdpa_kernel(CUDA_SDPA):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)
        return super().attend_cached(q, keys, values, mask)
