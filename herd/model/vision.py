"""Llama 4's vision encoder, pixel-shuffle adapter and projection into the text width (SPEC §3).

Per tile: 14×14 patches -> linear patch embedding (no bias) -> class token appended LAST ->
learned positional embedding -> LayerNorm -> transformer layers (LayerNorm, attention with biases
and 2-D rotary embedding over patch column and row, GELU MLP) -> LayerNorm -> class token dropped
-> pixel shuffle (each r⁻¹×r⁻¹ group of patches becomes one vector) -> 2-layer MLP with GELU after
both layers -> linear projection to the text width. Tiles are independent: a batch of tiles is a
batch.

Shape legend: n tiles, P patches per tile (+1 with the class token), C vision width, S tile side,
Q vectors per tile after the shuffle, Dt text width, Hv heads, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import VisionConfig
from herd.model.layers import Linear, apply_rope

LN_EPS = 1e-5  # both references build their LayerNorms with torch's default, whatever a config says


def vision_rope(cfg: VisionConfig) -> torch.Tensor:
    """Rotations [P+1, Dh/2] (complex64) for the 2-D rotary embedding; the class token (last) is not rotated.

    The first Dh/4 rotated pairs of each head turn with the patch's column, the next Dh/4 with its
    row, both counted from 1; frequencies theta^(-4k/Dh). This is the references' axial RoPE.
    """
    side = cfg.image_size // cfg.patch_size
    head_dim = cfg.dim // cfg.n_heads
    idx = torch.arange(side * side, device="cpu")  # real values even inside a meta-device context
    col, row = (idx % side + 1).float(), (idx // side + 1).float()
    steps = torch.arange(0, head_dim // 2, 2, device="cpu")[: head_dim // 4].float()
    inv = 1.0 / cfg.rope_theta ** (steps / (head_dim // 2))
    angles = torch.cat([col[:, None] * inv, row[:, None] * inv], dim=-1)  # [P, Dh/2]
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1], device="cpu")])  # class token: angle 0
    return torch.polar(torch.ones_like(angles), angles)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wq, self.wk, self.wv, self.wo = (Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x_nPC: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        q, k, v = (w(x_nPC).unflatten(-1, (self.n_heads, -1)) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        # Every patch sees every patch of its tile (no mask); scale 1/sqrt(Dh).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).flatten(2))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim, eps=LN_EPS), nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg.dim, cfg.mlp_dim)

    def forward(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rot)
        return x + self.mlp(self.norm2(x))


def pixel_shuffle(x_nPC: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n, P, C] patches on a side×side grid -> [n, P·r², C/r²]: each (1/r)×(1/r) block becomes one vector.

    The channel order within a merged vector is the references': first the column pairs are folded
    into the channels, then the row pairs (with the transposes in between that they use).
    """
    n, p, c = x_nPC.shape
    side = round(p ** 0.5)
    k = round(1 / ratio)  # patches merged along each axis (2 for ratio 0.5)
    x = x_nPC.reshape(n, side, side // k, c * k)  # [n, row, col/k, C·k]: column neighbours joined
    x = x.transpose(1, 2).reshape(n, side // k, side // k, c * k * k)  # [n, col/k, row/k, C·k²]: rows joined
    return x.transpose(1, 2).reshape(n, -1, c * k * k)  # back to row-major order of the merged grid


class VisionModel(nn.Module):
    """Tiles [n, 3, S, S] (normalised float) -> image features [n, Q, Dt] in the text model's width."""

    def __init__(self, cfg: VisionConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        n_patches = (cfg.image_size // p) ** 2
        self.patch_embed = Linear(3 * p * p, d, bias=False)  # over (channel, row, col)-flattened patches
        self.class_token = nn.Parameter(torch.zeros(d))
        self.pos_embed = nn.Parameter(torch.zeros(n_patches + 1, d))
        self.norm_pre = nn.LayerNorm(d, eps=LN_EPS)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_post = nn.LayerNorm(d, eps=LN_EPS)
        self.adapter_fc1 = Linear(int(d / cfg.pixel_shuffle_ratio ** 2), cfg.projector_input_dim, bias=False)
        self.adapter_fc2 = Linear(cfg.projector_input_dim, cfg.output_dim, bias=False)
        self.projector = Linear(cfg.output_dim, text_dim, bias=False)
        self.rope = vision_rope(cfg)  # complex64 on the CPU, not a buffer (as TextModel.inv_freq)

    @property
    def tokens_per_tile(self) -> int:
        side = self.cfg.image_size // self.cfg.patch_size
        return round(side * side * self.cfg.pixel_shuffle_ratio ** 2)

    def forward(self, pixels_n3SS: torch.Tensor) -> torch.Tensor:
        p = self.cfg.patch_size
        w = self.patch_embed.weight
        # A strided convolution is the patch embedding: same sums as unfold + linear, one kernel.
        x = F.conv2d(pixels_n3SS.to(w.dtype), w.view(-1, 3, p, p), stride=p)  # [n, C, side, side]
        x = x.flatten(2).transpose(1, 2)  # [n, P, C], patches in row-major order
        x = torch.cat([x, self.class_token.expand(x.shape[0], 1, -1)], dim=1)  # class token last
        x = self.norm_pre(x + self.pos_embed)
        rot = self.rope.to(x.device)
        for layer in self.layers:
            x = layer(x, rot)
        x = self.norm_post(x)[:, :-1]  # [n, P, C]
        x = pixel_shuffle(x, self.cfg.pixel_shuffle_ratio)  # [n, Q, C/r²]
        x = F.gelu(self.adapter_fc2(F.gelu(self.adapter_fc1(x))))  # [n, Q, output_dim]
        return self.projector(x)  # [n, Q, Dt]
