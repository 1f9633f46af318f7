"""The Llama 4 text decoder: pre-norm blocks, final RMSNorm, untied output head.

h = x + attn(norm(x)); out = h + ffn(norm(h)). The ffn of layer i is MoE when cfg.is_moe[i],
otherwise a dense SwiGLU of width cfg.ffn_dim. Pure and single-device: no caches, no process
groups, no device moves inside.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from herd.config import TextConfig

from herd.model.attention import Attention, CacheEntries, CacheSlots, cache_slots, packing
from herd.model.layers import Linear, RMSNorm, SwiGLU, rope_rotations, rope_inv_freq
from herd.model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg.dim, cfg.moe) if cfg.is_moe[layer] else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x_BTD, positions, rot, packed=None):
        h = x_BTD + self.attention(self.attention_norm(x_BTD), positions, rot, packed)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_cached(self, x_BTD, pos_BT, rot, k_cache, v_cache, at: CacheSlots):
        h = x_BTD + self.attention.forward_cached(self.attention_norm(x_BTD), pos_BT, rot, k_cache, v_cache, at)
        return h + self.feed_forward(self.ffn_norm(h))


class TextModel(nn.Module):
    """Token ids [B, T] -> logits [B, T, V] (float32)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived from the config, float32 on the CPU, and deliberately not a buffer: Module.to(dtype)
        # would round it to bf16, and building on the meta device would leave it empty.
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # Training option: recompute each block in the backward pass instead of keeping its activations.
        self.activation_checkpointing = False

    def forward(self, tokens_BT: torch.Tensor, image_mask_BT: torch.Tensor | None = None,
                image_features_ND: torch.Tensor | None = None, *, segments_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None, head=None) -> torch.Tensor:
        """Logits [B, T, V] (float32); see `hidden` for the arguments. ``head``: a function
        (model, hidden [B, T, D]) that replaces `head`, run inside this call (training computes its
        loss there: herd.train.loss)."""
        h = self.hidden(tokens_BT, image_mask_BT, image_features_ND, segments_BT=segments_BT, positions_BT=positions_BT)
        return self.head(h) if head is None else head(self, h)

    def hidden(self, tokens_BT: torch.Tensor, image_mask_BT: torch.Tensor | None = None,
               image_features_ND: torch.Tensor | None = None, *, segments_BT: torch.Tensor | None = None,
               positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output [B, T, D] (before the final norm). With images, the N positions where
        image_mask_BT is True (row-major order) take the N image feature vectors instead of their token
        embeddings (early fusion). Packed rows (training) give each token's document id and position
        within it (see `packing`)."""
        return self.decode_layers(self.embed(tokens_BT, image_mask_BT, image_features_ND), segments_BT, positions_BT)

    def embed(self, tokens_BT: torch.Tensor, image_mask_BT: torch.Tensor | None = None,
              image_features_ND: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D], with image features in the masked positions (early fusion)."""
        h = self.tok_embeddings(tokens_BT)
        if image_features_ND is not None:
            h = h.index_put((image_mask_BT,), image_features_ND.to(h.dtype))
        return h

    def decode_cached(self, h_BTD: torch.Tensor, pos_BT: torch.Tensor, k_caches: list[CacheEntries],
                      v_caches: list[CacheEntries], rows: slice) -> torch.Tensor:
        """All blocks over new tokens of cached sequences (see Attention.forward_cached); hidden [B, T, D]."""
        rot = rope_rotations(pos_BT, self.inv_freq)  # (B, T, Dh/2)
        slots: dict[int | None, CacheSlots] = {}  # per layer kind (its chunk), computed once
        for layer, k, v in zip(self.layers, k_caches, v_caches):
            chunk = layer.attention.chunk
            if chunk not in slots:
                slots[chunk] = cache_slots(pos_BT, rows, chunk)
            h_BTD = layer.forward_cached(h_BTD, pos_BT, rot, k, v, slots[chunk])
        return h_BTD

    def decode_layers(self, h_BTD: torch.Tensor, segments_BT: torch.Tensor | None = None,
                      positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """All decoder blocks over embeddings [B, T, D] that start at position 0, or over packed rows."""
        T = h_BTD.shape[1]
        if segments_BT is None:
            positions = torch.arange(T, device=h_BTD.device)[None]  # (1, T)
            packs = {}
        else:
            positions = positions_BT
            # One layout per layer kind (its chunk), shared by the layers of that kind.
            packs = {c: packing(segments_BT, positions_BT, c) for c in {b.attention.chunk for b in self.layers}}
        rot = rope_rotations(positions, self.inv_freq)  # (1 or B, T, Dh/2), shared by every RoPE layer
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            packed = packs.get(layer.attention.chunk)
            if recompute:
                h_BTD = checkpoint(layer, h_BTD, positions, rot, packed, use_reentrant=False)
            else:
                h_BTD = layer(h_BTD, positions, rot, packed)
        return h_BTD

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection; logits in float32 whatever the weights' dtype."""
        return self.output(self.norm(h_BTD)).float()
