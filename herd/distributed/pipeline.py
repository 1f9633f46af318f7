"""Pipeline parallelism for inference: one stage's layers of a loaded text decoder, applied from outside.

`split(model, tp)` keeps stage s of P its contiguous layers (`TensorParallel.layers`) and swaps the
model's class for `StageModel`, whose three steps pass activations along with plain point-to-point
calls (every rank runs the same plan, so each knows the shapes it receives):

- `embed`: stage 0 embeds (image features included); later stages keep no embedding;
- `decode_cached`: a later stage first receives the hidden states [B, T, D] from the same
  tensor-parallel rank of the stage before; every stage but the last sends its output on. Positions
  need no sending: they are in the plan every rank has (temperature tuning reads them);
- `head`: the last stage computes the logits (gathered over its tensor-parallel group) and its
  rank 0 sends them to global rank 0, the one that samples; no other stage keeps an output head.

Combined with tensor parallelism (T x P processes), each stage is a tensor-parallel group of its
own (`herd.distributed.tensor`), and activations go from rank t of one stage to rank t of the next.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from herd.distributed.tensor import BYTES, COUNTS, Part, TensorParallel, TPTextModel, shard_parts


def send(t: torch.Tensor, dst: int) -> None:
    COUNTS["send"] += 1
    BYTES["send"] += t.numel() * t.element_size()
    dist.send(t.contiguous(), dst)


def recv(t: torch.Tensor, src: int) -> torch.Tensor:
    COUNTS["recv"] += 1
    BYTES["recv"] += t.numel() * t.element_size()
    dist.recv(t, src)
    return t


class StageModel(TPTextModel):
    """A text decoder holding one pipeline stage's layers (see the module's docstring)."""

    def embed(self, tokens_BT, image_mask_BT=None, image_features_ND=None):
        if self.tp.stage == 0:
            return super().embed(tokens_BT, image_mask_BT, image_features_ND)
        return tokens_BT  # only its shape matters: decode_cached receives the hidden states

    def decode_cached(self, h_BTD, pos_BT, k_caches, v_caches, rows):
        tp = self.tp
        if tp.stage > 0:
            w = self.tok_embeddings.weight  # empty here, but of the hidden states' dtype and device
            h_BTD = recv(torch.empty(*pos_BT.shape, self.cfg.dim, dtype=w.dtype, device=w.device),
                         tp.global_rank(tp.stage - 1))
        h_BTD = super().decode_cached(h_BTD, pos_BT, k_caches, v_caches, rows)
        if tp.stage < tp.stages - 1:
            send(h_BTD, tp.global_rank(tp.stage + 1))
        return h_BTD

    def head(self, h_BTD):
        tp = self.tp
        last = tp.stages - 1
        if tp.stage == last:
            logits = super().head(h_BTD)
            if tp.rank == 0 and last > 0:
                send(logits, 0)
            return logits if tp.leader else None
        if tp.leader:
            return recv(torch.empty(h_BTD.shape[0], self.cfg.vocab_size, device=h_BTD.device), tp.global_rank(last, 0))
        return None


class StageLayers(nn.ModuleList):
    """A stage's layers under their indices in the whole model (``layers.{i}``), so a checkpoint's
    names and the loader's parts apply to them unchanged; iterated in order, indexed by position."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]


def split(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Keep stage ``tp.stage``'s layers of ``model`` (already tensor-parallel sharded where T > 1), in
    place; the embedding stays on stage 0 only and the output head on the last stage only. On a model
    built on the meta device, before loading: the loader then reads only what the stage keeps."""
    model.layers = StageLayers({i: model.layers[i] for i in tp.layers(model.cfg.n_layers)})
    if tp.stage > 0:  # an empty embedding: no rows, but the dtype and device the engine reads
        w = model.tok_embeddings.weight
        w.data = w.data.new_empty(0, w.shape[1])
    if tp.stage < tp.stages - 1:
        w = model.output.weight
        w.data = w.data.new_empty(0, w.shape[1])
    model.__class__ = StageModel
    model.tp = tp
    return model


def stage_parts(model: nn.Module, tp: TensorParallel) -> dict[str, Part]:
    """`shard` (where T > 1) and `split` a model built on the meta device; the parts of each tensor the
    rank reads (none of the embedding after stage 0, none of the head before the last stage; other
    stages' layers are not in the model, so the loader reads nothing of them)."""
    table = shard_parts(model, tp) if tp.size > 1 else {}
    split(model, tp)
    none = Part(0, 0, 0, 0)
    if tp.stage > 0:
        table["tok_embeddings.weight"] = none
    if tp.stage < tp.stages - 1:
        table["output.weight"] = none
    return table
