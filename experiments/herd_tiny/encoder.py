"""herd-tiny's vision-encoder pretraining: the encoder alone learns, from the generator's labels,
which shape (if any) each of the six colours has in a picture; `herd train` then starts from it
(`model.vision_init`).

Why a separate stage: trained only through the decoder's answers, a from-scratch encoder sat at
chance for hundreds of steps (the decoder cannot learn to read features that carry nothing yet, and
the encoder gets no useful gradient from a decoder that does not read it); with informative features
the decoder learns to read them within ~40 steps (measured in probes: colour 91% at step 100 of
`herd train` with this encoder, chance at steps 100-600 without it). This is the small
version of what vision-language models do with a pretrained image encoder.

Two heads (discarded afterwards) learn from each picture:
- per colour, one of absent / circle / square / triangle, each shape's score the best over the
  tile's tokens (max-pooled: a linear head over the flattened tokens learned colours but stayed at
  chance on shapes);
- (``token_labels``) per image token, which coloured shape covers its 28x28-pixel square (or none), read
  from the tile's own pixels: every token of a shape learns to carry what the shape is, not only
  the best one, so a decoder reading any of them finds it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from herd.config import from_hf_config
from herd.images import ImageTiler
from herd.model.vision import VisionModel
from experiments.herd_tiny import shapes
from herd.train.trainer import save_start

EASY_SHARE = 0.3  # share of single large-shape pictures (build.EASY_SIZE) among the spec's pictures


class PoolHead(nn.Module):
    """Per colour, logits for absent / circle / square / triangle from a tile's tokens [B, Q, D]:
    each shape class is the best match over the tokens (max-pooled, so a shape is recognised
    wherever it lies), absent a learned threshold."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = nn.Linear(dim, len(shapes.COLORS) * len(shapes.SHAPES))
        self.absent = nn.Parameter(torch.zeros(len(shapes.COLORS), 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats / (feats.pow(2).mean((1, 2), keepdim=True).sqrt() + 1e-6)  # unit-RMS tokens
        best = self.shape(feats).amax(1).view(feats.shape[0], len(shapes.COLORS), len(shapes.SHAPES))
        return torch.cat([self.absent.expand(feats.shape[0], -1, -1), best], -1)  # [B, colours, 4]


class TokenHead(nn.Module):
    """Per image token [B, Q, D], logits over none + each (colour, shape) pair ([B, Q, 1 + 6 x 3])."""

    def __init__(self, dim: int):
        super().__init__()
        self.out = nn.Linear(dim, 1 + len(shapes.COLORS) * len(shapes.SHAPES))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.out(feats / (feats.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6))


PALETTE = torch.tensor(list(shapes.COLORS.values()), dtype=torch.float32)  # [6, 3]
TOKEN_COVER = 0.1  # a token is labelled with the colour covering at least this share of its square


def tokens_labelled(tiles: torch.Tensor, target: torch.Tensor, side: int) -> torch.Tensor:
    """[B, side*side] labels of a tile's image tokens (row-major over its side x side squares, the
    order of `pixel_shuffle`'s output): 0 for none, else 1 + colour * 3 + shape of the colour that
    covers most of the square (at least TOKEN_COVER of it), that colour's shape in the scene (from
    ``target`` [B, 6], the pictures' `labels`)."""
    rgb = (tiles.float() * 0.5 + 0.5) * 255  # the tiler's normalisation undone: [B, 3, S, S]
    dist = (rgb.unsqueeze(1) - PALETTE.view(1, -1, 3, 1, 1)).pow(2).sum(2)  # [B, 6, S, S]
    near = (dist < 60.0 ** 2).float()  # pixels of each palette colour (edges blended by the resize drop out)
    cover = nn.functional.adaptive_avg_pool2d(near, side).flatten(2)  # [B, 6, side*side]: share of each square
    share, colour = cover.max(1)
    kind = (target - 1).clamp(min=0)  # [B, 6]: each colour's shape index (absent colours are never picked)
    label = 1 + colour * len(shapes.SHAPES) + kind.gather(1, colour)
    return label.where(share >= TOKEN_COVER, 0)


def labels(scene: shapes.Scene) -> list[int]:
    """Per colour (in shapes.COLORS order): 0 absent, else 1 + the index of its shape in shapes.SHAPES."""
    kinds = {s.color: s.kind for s in scene.shapes}
    return [1 + shapes.SHAPES.index(kinds[c]) if c in kinds else 0 for c in shapes.COLORS]


def pretrain_encoder(config: str | Path, out: str | Path, steps: int = 1000, batch: int = 32, lr: float = 2e-3,
                     seed: int = 0, init_std: float = 0.02, progress: bool = True, token_labels: bool = False) -> dict:
    """Train the encoder of ``config`` (a config.json) and write its weights to ``out`` (.safetensors);
    ``token_labels``: with the per-token head too (TokenHead).
    Returns the last 50 steps' mean loss and share of pictures with every colour's label right, on
    the training stream (fresh pictures every step, so never seen before)."""
    from experiments.herd_tiny.build import EASY_SIZE
    from herd.train.trainer import init_for_training, lr_factor
    cfg = from_hf_config(json.loads(Path(config).read_text()), str(config))
    if cfg.vision is None:
        raise ValueError(f"{config}: the architecture has no vision encoder")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tiler = ImageTiler(cfg.vision, 1)
    vision = VisionModel(cfg.vision, cfg.text.dim)
    init_for_training(vision, seed + 1, init_std, cfg.vision.n_layers)
    head = PoolHead(cfg.text.dim)
    token_head = TokenHead(cfg.text.dim) if token_labels else None
    side = round(vision.tokens_per_tile ** 0.5)
    params = [*vision.parameters(), *head.parameters(), *(token_head.parameters() if token_head else ())]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    vision.train()
    started, recent = time.perf_counter(), []
    bar = tqdm(range(steps), desc="herd-tiny encoder", disable=not progress)
    for step in bar:
        for g in opt.param_groups:  # herd train's schedule: linear warm-up over 10%, then cosine to 10%
            g["lr"] = lr * lr_factor(step, max(1, steps // 10), steps, 0.1)
        scenes = [shapes.random_scene(rng, 1, EASY_SIZE) if rng.random() < EASY_SHARE else shapes.random_scene(rng)
                  for _ in range(batch)]
        tiles = torch.cat([tiler(s.draw())[0] for s in scenes])
        target = torch.tensor([labels(s) for s in scenes])
        feats = vision(tiles)  # [B, tokens, D]
        logits = head(feats)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        if token_head is not None:
            loss = loss + nn.functional.cross_entropy(token_head(feats).flatten(0, 1),
                                                      tokens_labelled(tiles, target, side).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        exact = (logits.argmax(-1) == target).all(-1).float().mean()  # every colour right
        recent = (recent + [(loss.detach().item(), exact.item())])[-50:]
        bar.set_postfix(loss=f"{recent[-1][0]:.3f}", acc=f"{recent[-1][1]:.2f}")
    held_out = _held_out(vision, head, tiler, seed + 999)
    save_start(vision, out)
    return {"loss": sum(r[0] for r in recent) / len(recent), "accuracy": sum(r[1] for r in recent) / len(recent),
            "steps": steps, "seconds": time.perf_counter() - started, **held_out}


@torch.no_grad()
def _held_out(vision: VisionModel, head: PoolHead, tiler: ImageTiler, seed: int, n: int = 300) -> dict:
    """The head's accuracy on fresh pictures of the spec's distribution: shape and colour of single
    shapes, count and every label of 1-3 shapes (what the decoder will be asked)."""
    rng = random.Random(seed)
    vision.eval()
    single = [shapes.random_scene(rng, 1) for _ in range(n)]
    multi = [shapes.random_scene(rng) for _ in range(n)]

    def predict(scenes):
        return head(vision(torch.cat([tiler(s.draw())[0] for s in scenes]))).argmax(-1)

    p1, pm = predict(single), predict(multi)
    t1, tm = torch.tensor([labels(s) for s in single]), torch.tensor([labels(s) for s in multi])
    present = t1 > 0  # the one colour each single picture has
    return {"shape": float((p1[present] == t1[present]).float().mean()),
            "color": float(((p1 > 0) == present).all(-1).float().mean()),
            "count": float(((pm > 0).sum(-1) == (tm > 0).sum(-1)).float().mean()),
            "all": float((pm == tm).all(-1).float().mean())}
