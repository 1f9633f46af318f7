"""The training loss: cross-entropy of the output head's logits, computed without ever holding them."""

from __future__ import annotations

import torch

from herd.model.transformer import TextModel

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


def summed_loss(model: TextModel, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                image_mask_BT: torch.Tensor | None = None, image_features_ND: torch.Tensor | None = None, *,
                segments_BT: torch.Tensor | None = None, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
    """The summed float32 cross-entropy of the model's next-token predictions over the positions whose
    target is not IGNORE_INDEX (no [B, T, V] logits exist; see LinearCrossEntropy). Computed inside
    the model's forward call, where FSDP has gathered the head's weight."""
    learn = targets_BT != IGNORE_INDEX

    def loss(m: TextModel, h_BTD: torch.Tensor) -> torch.Tensor:
        lora = m.output.adapter
        extra = (lora.A, lora.B, lora.scale) if lora is not None else ()
        # A quantized head (QLoRA, herd.kernels.quant) is frozen: dequantized for this step only.
        w = m.output.weight if hasattr(m.output, "weight") else m.output.dequantized()
        return LinearCrossEntropy.apply(m.norm(h_BTD)[learn], w, targets_BT[learn], *extra)

    return model(tokens_BT, image_mask_BT, image_features_ND, segments_BT=segments_BT, positions_BT=positions_BT,
                 head=loss)
