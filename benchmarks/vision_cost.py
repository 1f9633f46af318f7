"""What the vision encoder costs: tiles/s, and its share of prefill for a 4-image prompt, at Scout's widths.

    python benchmarks/vision_cost.py [--vision-layers 2] [--images 4] [--grid 2x2] [--threads N] [--json]

Real Scout shapes, random float32 weights, on this machine's CPU:
  - vision: width 1408, 16 heads, MLP 5632, 336-pixel tiles (576 patches -> 144 tokens), adapter to
    4096, projection to 5120; ``--vision-layers`` encoder layers (Scout has 34);
  - text: one Scout decoder layer (width 5120, 40 query / 8 KV heads, 16 experts of 8192 + shared
    expert, top-1), timed over the whole prompt; Scout has 48 such layers.
The prompt: ``--images`` images of ``--grid`` tiles each (+ the thumbnail) between short texts.
Reported: tiles/s at several batch sizes; prefill time split into vision encoder vs decoder layers
for the measured depths, and extrapolated to Scout's full depth (fixed part + 34 x one encoder
layer, 48 x one text layer; the embedding lookup and the last-token head are left out, both
negligible at this length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.config import PRESETS  # noqa: E402
from herd import kernels  # noqa: E402
from herd.model.init import init_weights  # noqa: E402
from herd.model.transformer import TextModel  # noqa: E402
from herd.model.vision import VisionModel  # noqa: E402

SCOUT_VISION_LAYERS, SCOUT_TEXT_LAYERS = 34, 48


def timed(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--grid", default="2x2", help="tiles per image as ROWSxCOLS (a thumbnail is added if > 1)")
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens around the images")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, cols = (int(x) for x in args.grid.lower().split("x"))
    tiles_per_image = rows * cols + (1 if rows * cols > 1 else 0)

    scout = PRESETS["scout"]
    vcfg = dataclasses.replace(scout.vision, n_layers=args.vision_layers)
    # One Scout decoder layer; a tiny vocabulary since embeddings and head are not timed.
    tcfg = dataclasses.replace(scout.text, n_layers=1, uses_rope=(True,), is_moe=(True,), vocab_size=256)
    print(f"building Scout-width vision ({args.vision_layers} layers) and one Scout text layer ...", file=sys.stderr)
    vision = init_weights(VisionModel(vcfg, tcfg.dim)).eval()
    text = init_weights(TextModel(tcfg)).eval()
    kernels.apply(text, vision)  # the fast paths herd.load installs
    per_tile = vision.tokens_per_tile
    n_tiles = args.images * tiles_per_image
    T = n_tiles * per_tile + args.text_tokens

    out: dict = {"threads": args.threads, "vision_layers": args.vision_layers, "tiles_per_s": {}}
    with torch.inference_mode():
        for batch in (1, 4, 16):
            pixels = torch.randn(batch, 3, vcfg.image_size, vcfg.image_size)
            secs = timed(lambda: vision(pixels), repeat=3 if batch < 16 else 1)
            out["tiles_per_s"][batch] = batch / secs
            print(f"vision encoder: batch {batch:2d} tiles -> {batch / secs:6.2f} tiles/s", file=sys.stderr)
        pixels = torch.randn(n_tiles, 3, vcfg.image_size, vcfg.image_size)
        t_vision = timed(lambda: vision(pixels), repeat=1)
        # One encoder layer alone, to split the encoder into a per-layer and a fixed part (patch
        # embedding, adapter, projection) for the full-depth estimate.
        x = torch.randn(n_tiles, vision.pos_embed.shape[0], vcfg.dim)
        t_vlayer = timed(lambda: vision.layers[0](x, vision.rope), repeat=1)
        h = torch.randn(1, T, tcfg.dim) * 0.02
        print(f"prefill: {T} tokens through one text layer ...", file=sys.stderr)
        t_layer = timed(lambda: text.decode_layers(h), repeat=1)
    fixed = max(t_vision - args.vision_layers * t_vlayer, 0.0)
    full_vision = fixed + SCOUT_VISION_LAYERS * t_vlayer
    full_text = t_layer * SCOUT_TEXT_LAYERS
    out.update(prompt_tokens=T, tiles=n_tiles, vision_s=t_vision, vision_layer_s=t_vlayer, vision_fixed_s=fixed,
               text_layer_s=t_layer,
               share_measured=t_vision / (t_vision + t_layer * args.vision_layers),
               share_full_scout=full_vision / (full_vision + full_text))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"\n{args.images} images x {tiles_per_image} tiles = {n_tiles} tiles, prompt {T} tokens, "
          f"{args.threads} threads, float32")
    print(f"{'':34} {'seconds':>9}")
    print(f"{'vision encoder, ' + str(args.vision_layers) + ' layers':34} {t_vision:9.2f}")
    print(f"{'  of which one encoder layer':34} {t_vlayer:9.2f}")
    print(f"{'  of which embed/adapter/projection':34} {fixed:9.2f}")
    print(f"{'one Scout text layer over the prompt':34} {t_layer:9.2f}")
    print(f"vision share of prefill, {args.vision_layers} vision + {args.vision_layers} text layers: "
          f"{out['share_measured']:.1%}")
    print(f"vision share of prefill, full Scout ({SCOUT_VISION_LAYERS} vision + {SCOUT_TEXT_LAYERS} text layers, "
          f"extrapolated): {out['share_full_scout']:.1%}")
    print(f"tiles/s, {args.vision_layers}-layer encoder: " + ", ".join(
        f"batch {b}: {v:.2f}" for b, v in out["tiles_per_s"].items()))
    print(f"tiles/s, full {SCOUT_VISION_LAYERS}-layer encoder (extrapolated): {n_tiles / full_vision:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
