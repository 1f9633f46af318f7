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

from herd.model.attention import Attention, CacheSlots, cache_slots, packing
from herd.model.layers import Linear, RMSNorm, SwiGLU, rope_rotations, rope_inv_freq
from herd.model.moe import MoE


IGNORE_INDEX = -100  # targets that are not learned (cross_entropy's ignore_index)
_LOSS_ROWS = 512  # positions per output-head slice in the training loss: bounds the [N, V] logits


class LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n W^T [+ s (h_n A^T) B^T], t_n) with its gradients computed slice by slice in the
    forward pass (the bracket: a LoRA adapter on the head, A [r, D], B [V, r], scale s).

    The [N, V] logits never exist whole (1.6 GB at 4 x 512 tokens x 202,048 ids) and are never
    recomputed: each slice's softmax turns straight into g = d logits = softmax - onehot, then into
    dh (kept, [N, D]) and the weight gradients (accumulated); backward only scales them. Float32.
    """

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, a_RD=None, b_VR=None, scale=1.0):
        with torch.autocast(h_ND.device.type, enabled=False):  # float32 whatever the autocast around
            return LinearCrossEntropy._forward(ctx, h_ND, w_VD, t_N, a_RD, b_VR, scale)

    @staticmethod
    def _forward(ctx, h_ND, w_VD, t_N, a_RD, b_VR, scale):
        need = ctx.needs_input_grad
        h, w = h_ND.float(), w_VD.float()
        lora = a_RD is not None
        dh = torch.empty_like(h) if need[0] else None
        dw = torch.zeros_like(w) if need[1] else None
        da = torch.zeros_like(a_RD, dtype=torch.float32) if lora and need[3] else None
        db = torch.zeros_like(b_VR, dtype=torch.float32) if lora and need[4] else None
        total = h.new_zeros(())
        for i in range(0, h.shape[0], _LOSS_ROWS):
            hs, ts = h[i:i + _LOSS_ROWS], t_N[i:i + _LOSS_ROWS]
            logits = hs @ w.t()  # (n, V)
            if lora:
                u = hs @ a_RD.float().t()  # (n, r)
                logits.addmm_(u, b_VR.float().t(), alpha=scale)
            logp = torch.log_softmax(logits, dim=-1)
            total += -logp.gather(1, ts[:, None]).sum()
            if not any(need):
                continue
            g = logp.exp_()  # softmax, in place of the log-probabilities
            g[torch.arange(ts.shape[0], device=ts.device), ts] -= 1.0
            if lora:
                gb = g @ b_VR.float()  # (n, r)
            if dh is not None:
                dh[i:i + _LOSS_ROWS] = g @ w
                if lora:
                    dh[i:i + _LOSS_ROWS].addmm_(gb, a_RD.float(), alpha=scale)
            if dw is not None:
                dw.addmm_(g.t(), hs)
            if da is not None:
                da.addmm_(gb.t(), hs, alpha=scale)
            if db is not None:
                db.addmm_(g.t(), u, alpha=scale)
        ctx.present = [t is not None for t in (dh, dw, da, db)]
        ctx.save_for_backward(*(t for t in (dh, dw, da, db) if t is not None))
        ctx.dtypes = [h_ND.dtype, w_VD.dtype] + ([a_RD.dtype, b_VR.dtype] if lora else [None, None])
        return total

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dh, dw, da, db = [(next(saved) * grad).to(dt) if present else None
                          for present, dt in zip(ctx.present, ctx.dtypes)]
        return (dh, dw, None, da, db, None)[:len(ctx.needs_input_grad)]


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
        # Inference option (`compile_head`): the one-row output product as a compiled kernel.
        self.head_gemv = None

    def forward(self, tokens_BT: torch.Tensor, image_mask_BT: torch.Tensor | None = None,
                image_features_ND: torch.Tensor | None = None, *, segments_BT: torch.Tensor | None = None,
                positions_BT: torch.Tensor | None = None, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]; with images, the N positions where image_mask_BT is True (row-major order)
        take the N image feature vectors instead of their token embeddings (early fusion). Packed rows
        (training) give each token's document id and position within it (see `packing`).

        With ``targets_BT`` (training), the summed float32 cross-entropy over the positions whose target
        is not IGNORE_INDEX instead (see LinearCrossEntropy: no [B, T, V] logits).
        """
        h = self.decode_layers(self.embed(tokens_BT, image_mask_BT, image_features_ND), segments_BT, positions_BT)
        if targets_BT is None:
            return self.head(h)
        learn = targets_BT != IGNORE_INDEX
        lora = self.output.adapter
        extra = (lora.A, lora.B, lora.scale) if lora is not None else ()
        return LinearCrossEntropy.apply(self.norm(h)[learn], self.output.weight, targets_BT[learn], *extra)

    def embed(self, tokens_BT: torch.Tensor, image_mask_BT: torch.Tensor | None = None,
              image_features_ND: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D], with image features in the masked positions (early fusion)."""
        h = self.tok_embeddings(tokens_BT)
        if image_features_ND is not None:
            h = h.index_put((image_mask_BT,), image_features_ND.to(h.dtype))
        return h

    def decode_cached(self, h_BTD: torch.Tensor, pos_BT: torch.Tensor, k_caches: list[torch.Tensor],
                      v_caches: list[torch.Tensor], rows: slice) -> torch.Tensor:
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
        h = self.norm(h_BTD)
        if self.head_gemv is not None and h.numel() == h.shape[-1] and self.output.adapter is None:
            return self.head_gemv(h.reshape(-1), self.output.weight).view(*h.shape[:-1], -1)
        return self.output(h).float()

    def compile_head(self) -> bool:
        """Batch-1 decode's output product (the largest read of a step: 414 MB for Llama 4's vocabulary
        at width 1024 in bf16) through a kernel torch.compile generates, for half-precision weights on a
        CPU: its logits are float32 sums of the exact products instead of bf16-rounded ones. On an
        AVX512-BF16 EPYC it also streamed the matrix faster (31-33 GB/s against 26-29 for torch's bf16
        GEMV, see `linear`); on a Xeon with AMX it is slower than oneDNN's product (18.8-19.4 ms against
        15.4-16.0 for the 202,048 x 1024 head).
        Costs a compilation at the first step (~20 s on a fresh machine, ~1.5 s from torch's cache),
        hence an option (herd.load(..., compile=True)). Returns whether it applies."""
        w = self.output.weight
        if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float16):
            return False
        self.head_gemv = torch.compile(_gemv_float32, dynamic=False)
        return True


def _gemv_float32(x_D: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """w x in float32 (x [D], w [V, D]), written elementwise so the compiler emits one streaming loop."""
    return (w_VD.float() * x_D.float()).sum(-1)
