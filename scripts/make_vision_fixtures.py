"""Write tests/fixtures/vision/* with the two reference preprocessors (one-off, rerunnable).

The references need torchvision, which must never be installed into the project's .venv (it
breaks the CPU torch there), so this script runs in a venv of its own, outside the repository:

    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow numpy
    /tmp/tvenv/bin/pip install torch==2.14.1 transformers llama-models
    /tmp/tvenv/bin/python scripts/make_vision_fixtures.py

Fixtures (read by tests/test_preprocess.py):
  grids.json           per (height, width, max_tiles): each reference's (rows, cols) and the
                       (height, width) the image is resized to before padding.
  images.json          per test image: its source, max_tiles, and each reference's (rows, cols).
  input_<name>.png     the synthetic test images (the photos come from llama_models/resources).
  meta_<name>.png      Meta's tiles quantized with round((x + 1) * 127.5) to uint8, which is
                       lossless (its values are k/255*2-1), stacked top to bottom: (N*T, T, RGB).
  hf_minus_meta.npz    per image, transformers' tiles quantized the same way minus Meta's, as
                       int8 (N, C, T, T): bf16 rounding and rare resize differences, so nearly
                       all zeros.
Meta's reference is run through its real entry point, ChatFormat._encode_content on the
image's encoded bytes; transformers' through Llama4ImageProcessor on the decoded PIL image.
"""

from __future__ import annotations

import importlib.resources
import io
import json
from pathlib import Path

import numpy as np
import torch
from llama_models.datatypes import RawMediaItem
from llama_models.llama4.args import Size, VisionArgs
from llama_models.llama4.chat_format import ChatFormat
from llama_models.llama4.preprocess import VariableSizeImageTransform
from llama_models.llama4.tokenizer import Tokenizer
from PIL import Image
from transformers.models.llama4 import image_processing_llama4
from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vision"
TILE = 336

# (height, width): tiny, around one tile, common photo shapes, exact canvases, 1:10 extremes.
# fmt: off
GRID_SIZES = [
    (1, 1), (1, 10), (10, 1), (30, 20), (20, 30), (100, 1000), (1000, 100), (335, 335),
    (336, 336), (337, 337), (336, 672), (672, 336), (400, 1200), (1200, 300), (480, 640),
    (640, 480), (600, 800), (768, 1024), (1024, 768), (512, 512), (1080, 1920), (1920, 1080),
    (1280, 1280), (1344, 1344), (1345, 1344), (1344, 1345), (300, 3000), (3000, 300),
    (400, 4000), (4000, 400), (333, 999), (999, 333), (200, 1500), (1500, 200), (2048, 1536),
    (1536, 2048), (2000, 2000), (3000, 4000), (4000, 3000), (1, 4000), (1300, 325),
]
# fmt: on
# 16 is the default; 4 and 3 add sizes where the references' float rounding differs.
GRID_MAX_TILES = [16, 4, 3]

VISION_ARGS = VisionArgs(  # Llama 4 Scout/Maverick's vision encoder (only sizes matter here)
    image_size=Size(height=TILE, width=TILE),
    patch_size=Size(height=14, width=14),
    dim=1408,
    n_layers=34,
    n_heads=16,
    mlp_ratio=4.0,
    output_dim=4096,
    pixel_shuffle_ratio=0.5,
)


def meta_grid(height: int, width: int, max_tiles: int) -> dict:
    """Meta's (rows, cols) and pre-padding size, from VariableSizeImageTransform itself."""
    transform = VariableSizeImageTransform(TILE)
    seen = []
    pad = transform._pad

    def recording_pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
        seen.append(image.size)
        return pad(image, size)

    transform._pad = recording_pad
    _, (rows, cols) = transform(Image.new("RGB", (width, height)), max_num_chunks=max_tiles)
    ((resized_w, resized_h),) = seen
    return {"grid": [rows, cols], "resized": [resized_h, resized_w]}


def hf_grid(height: int, width: int, max_tiles: int) -> dict:
    """transformers' (rows, cols) and pre-padding size (its pad_to_best_fit sees the resized image)."""
    seen = []
    pad = image_processing_llama4.pad_to_best_fit

    def recording_pad(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        seen.append(tuple(images.shape[-2:]))
        return pad(images, size)

    image_processing_llama4.pad_to_best_fit = recording_pad
    try:
        image = Image.new("RGB", (width, height))
        out = Llama4ImageProcessor()(images=image, max_patches=max_tiles, return_tensors="pt")
    finally:
        image_processing_llama4.pad_to_best_fit = pad
    (resized,) = seen
    return {"grid": out["aspect_ratios"][0].tolist(), "resized": list(resized)}


def synthetic_images() -> dict[str, Image.Image]:
    """Deterministic test images: ramps, 8-pixel blocks, and 2-pixel diagonal stripes near the
    top that stress the antialias filter. Their sizes avoid the cases where transformers'
    float32 resize size is one pixel off Meta's (grids.json has those), so that the pixel
    comparison measures resampling alone."""

    def pattern(height: int, width: int) -> np.ndarray:
        y, x = np.mgrid[0:height, 0:width]
        r = (255 * x) // (width - 1)
        g = (255 * y) // (height - 1)
        b = np.where((x // 8 + y // 8) % 2 == 0, 40, 220)
        b = np.where((y < height // 4) & ((x + y) // 2 % 2 == 0), 255 - b, b)
        return np.stack([r, g, b], axis=-1).astype(np.uint8)

    wide = pattern(450, 1350)
    alpha = np.broadcast_to((255 * np.arange(1350)) // 1349, (450, 1350)).astype(np.uint8)
    alpha[150:300, 600:750] = 0  # fully transparent: must come out white
    return {
        # 1:3 with transparency, 4 tiles: a (1, 3) canvas, downscaled to 336 x 1008.
        "wide_rgba": Image.fromarray(np.dstack([wide, alpha]), "RGBA"),
        # 4:1 greyscale, 3 tiles: a (3, 1) canvas, downscaled to 1008 x 252.
        "tall_grey": Image.fromarray(pattern(1400, 350)[..., 1], "L"),
        # smaller than a tile: one tile, upscaled to 336 x 224.
        "tiny": Image.fromarray(pattern(30, 20), "RGB"),
    }


def quantize(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 with round((x + 1) * 127.5): exact for Meta's k/255*2-1 values."""
    return np.clip(np.round((pixels.float().numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def run_meta(data: bytes, max_tiles: int) -> tuple[torch.Tensor, list[int]]:
    """Meta's tiles and (rows, cols) through ChatFormat, as for a RawMediaItem in a prompt."""
    chat = ChatFormat(Tokenizer.get_instance(), vision_args=VISION_ARGS, max_num_chunks=max_tiles)
    _, (image,) = chat._encode_content(RawMediaItem(data=data))
    return image.image_tiles, list(image.aspect_ratio)


def run_hf(data: bytes, max_tiles: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' tiles (bfloat16) and (rows, cols)."""
    image = Image.open(io.BytesIO(data))
    out = Llama4ImageProcessor()(images=image, max_patches=max_tiles, return_tensors="pt")
    return out["pixel_values"], out["aspect_ratios"][0].tolist()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for max_tiles in GRID_MAX_TILES:
        for height, width in GRID_SIZES:
            cases.append(
                {
                    "height": height,
                    "width": width,
                    "max_tiles": max_tiles,
                    "meta": meta_grid(height, width, max_tiles),
                    "hf": hf_grid(height, width, max_tiles),
                }
            )
    (OUT / "grids.json").write_text(json.dumps({"tile_size": TILE, "cases": cases}, indent=1) + "\n")
    disagree = [c for c in cases if c["meta"] != c["hf"]]
    print(f"grids: {len(cases)} cases, references disagree on {len(disagree)}: {disagree}")

    resources = importlib.resources.files("llama_models") / "resources"
    inputs = {
        "dog": ("llama_models:resources/dog.jpg", (resources / "dog.jpg").read_bytes(), 4),
        "pasta": ("llama_models:resources/pasta.jpeg", (resources / "pasta.jpeg").read_bytes(), 6),
    }
    synthetic_tiles = {"wide_rgba": 4, "tall_grey": 3, "tiny": 16}
    for name, image in synthetic_images().items():
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        (OUT / f"input_{name}.png").write_bytes(buffer.getvalue())
        inputs[name] = (f"input_{name}.png", buffer.getvalue(), synthetic_tiles[name])

    manifest, deltas = [], {}
    for name, (source, data, max_tiles) in inputs.items():
        meta, meta_grid_ = run_meta(data, max_tiles)
        hf, hf_grid_ = run_hf(data, max_tiles)
        assert meta.shape == hf.shape, (name, meta.shape, hf.shape)
        meta_q, hf_q = quantize(meta), quantize(hf)
        n_tiles = meta_q.shape[0]
        stacked = meta_q.transpose(0, 2, 3, 1).reshape(n_tiles * TILE, TILE, 3)  # (N*T, T, C)
        Image.fromarray(stacked, "RGB").save(OUT / f"meta_{name}.png", optimize=True)
        deltas[name] = (hf_q.astype(np.int16) - meta_q).astype(np.int8)
        manifest.append(
            {"name": name, "source": source, "max_tiles": max_tiles, "meta_grid": meta_grid_, "hf_grid": hf_grid_}
        )
        diff = (hf.float() - meta.float()).abs() / 2  # in [0, 1] pixel units
        print(
            f"{name}: {tuple(meta.shape)} grid meta {meta_grid_} hf {hf_grid_}; |hf - meta|: "
            f"mean {diff.mean() * 255:.4f}/255, max {diff.max() * 255:.3f}/255"
        )
    np.savez_compressed(OUT / "hf_minus_meta.npz", **deltas)
    (OUT / "images.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for path in sorted(OUT.iterdir()):
        print(f"{path.stat().st_size:9d}  {path.name}")
    print(f"{sum(p.stat().st_size for p in OUT.iterdir()):9d}  total")


if __name__ == "__main__":
    main()
