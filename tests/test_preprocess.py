"""Image preprocessing (herd/images.py) against fixtures from both references.

The fixtures come from Meta's llama_models and transformers' Llama4ImageProcessor, run once by
scripts/make_vision_fixtures.py (which needs torchvision, so it has its own venv).
"""

from __future__ import annotations

import base64
import importlib.resources
import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from herd.images import ImageError, _resized_size, best_grid, load_image, preprocess_image

FIXTURES = Path(__file__).parent / "fixtures" / "vision"
TILE = 336
# Pixel bound, in [0, 1] units (so 4/255 in the normalised [-1, 1] units the tiles are in).
MEAN_TOL = 2 / 255


def _grid_cases() -> list[dict]:
    return json.loads((FIXTURES / "grids.json").read_text())["cases"]


def _image_cases() -> list[dict]:
    return json.loads((FIXTURES / "images.json").read_text())


def _source(case: dict) -> Path:
    if case["source"].startswith("llama_models:"):
        return Path(str(importlib.resources.files("llama_models") / case["source"].split(":", 1)[1]))
    return FIXTURES / case["source"]


def _reference_tiles(name: str) -> dict[str, torch.Tensor]:
    """Both references' tiles in [-1, 1], from the quantized fixtures (see the script's docstring)."""
    meta_q = np.asarray(Image.open(FIXTURES / f"meta_{name}.png"))  # (N*T, T, C)
    meta_q = meta_q.reshape(-1, TILE, TILE, 3).transpose(0, 3, 1, 2).astype(np.int16)  # (N, C, T, T)
    hf_q = meta_q + np.load(FIXTURES / "hf_minus_meta.npz")[name]
    return {ref: torch.from_numpy(q / 127.5 - 1).float() for ref, q in (("meta", meta_q), ("hf", hf_q))}


@pytest.mark.parametrize("case", _grid_cases(), ids=lambda c: f"{c['height']}x{c['width']}-max{c['max_tiles']}")
def test_grid_and_resized_size_match_references(case):
    height, width, max_tiles = case["height"], case["width"], case["max_tiles"]
    grid = best_grid(height, width, TILE, max_tiles)
    assert list(grid) == case["meta"]["grid"] == case["hf"]["grid"]
    resized = _resized_size(height, width, *grid, TILE)
    assert list(resized) == case["meta"]["resized"]
    # transformers computes this size in float32 (its canvas is a tensor) and is sometimes one
    # pixel off Meta's float64 result (e.g. 400x1200 with 4 tiles: 1007 wide, not 1008).
    assert all(abs(a - b) <= 1 for a, b in zip(resized, case["hf"]["resized"], strict=True))


@pytest.mark.parametrize("case", _image_cases(), ids=lambda c: c["name"])
def test_pixels_match_references(case):
    tiles, grid = preprocess_image(_source(case), max_tiles=case["max_tiles"])
    rows, cols = grid
    assert list(grid) == case["meta_grid"] == case["hf_grid"]
    assert tiles.dtype == torch.float32
    assert tiles.shape == (rows * cols + (rows * cols > 1), 3, TILE, TILE)
    for ref, expected in _reference_tiles(case["name"]).items():
        assert tiles.shape == expected.shape
        diff = (tiles - expected).abs() / 2  # [0, 1] pixel units
        mean, worst = diff.mean().item(), diff.max().item()
        figures = f"{case['name']} vs {ref}: mean |diff| {mean * 255:.4f}/255, max {worst * 255:.2f}/255"
        assert mean <= MEAN_TOL, figures
        print(figures)


def test_single_tile_has_no_thumbnail_and_multi_tile_appends_it():
    tiles, grid = preprocess_image(Image.new("RGB", (300, 200), (10, 20, 30)))
    assert grid == (1, 1) and tiles.shape == (1, 3, TILE, TILE)
    tiles, grid = preprocess_image(Image.new("RGB", (700, 300), (255, 0, 0)))
    assert grid == (1, 3) and tiles.shape == (4, 3, TILE, TILE)
    # The thumbnail is the whole image squashed to one tile: no padding in it.
    assert torch.equal(tiles[-1, 0], torch.ones(TILE, TILE)) and torch.equal(tiles[-1, 1], -torch.ones(TILE, TILE))
    # Tiles are row-major and the padding (right of 700 columns) is black: -1 after normalising.
    assert torch.equal(tiles[2, 0, :, 700 - 2 * TILE :], -torch.ones(TILE, 3 * TILE - 700))


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 20, 40))
    rgb = load_image(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((30, 5)) == (255, 255, 255)  # fully transparent red -> white
    assert rgb.getpixel((5, 5)) == (127, 127, 255)  # half-transparent blue over white
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (60, 40), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 20, 60, 40))  # red on top, blue below
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    upright.rotate(90, expand=True).save(buffer, format="JPEG", exif=exif, quality=95)
    rgb = load_image(buffer.getvalue())
    assert rgb.size == (60, 40)
    top, bottom = rgb.getpixel((30, 5)), rgb.getpixel((30, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    assert load_image(buffer.getvalue()).getpixel((8, 8)) == (255, 0, 0)


def test_palette_greyscale_sixteen_bit_and_cmyk_modes():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(palette).getpixel((0, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert load_image(palette).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    deep = Image.new("I;16", (2, 1))
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32896)
    assert [load_image(deep).getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (128, 128, 128)]
    assert load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of data only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 50).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_inputs_path_bytes_and_data_url(tmp_path):
    data = _jpeg()
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    for image in (path, str(path), data, bytearray(data), memoryview(data), url):
        assert load_image(image).size == (64, 64)


@pytest.mark.parametrize(
    "image, kwargs, words",
    [
        (Image.new("RGB", (0, 5)), {}, ["zero-sized"]),
        (_jpeg((256, 256))[:1500], {}, ["truncated"]),
        (bytes(range(256)) * 8, {}, ["not a readable image"]),
        (_png(100_000, 100_000), {}, ["decompression bomb", "MAX_IMAGE_PIXELS"]),  # Pillow's error
        (_png(10_000, 10_000), {}, ["decompression bomb", "MAX_IMAGE_PIXELS"]),  # Pillow's warning
        (_png(10_000, 6_000), {}, ["60000000 pixels", "max_pixels=50000000"]),
        (_png(100, 100), {"max_pixels": 5_000}, ["10000 pixels", "max_pixels=5000"]),
        ("data:image/png;base64,@@@", {}, ["bad base64"]),
        ("data:text/plain;base64,aGk=", {}, ["malformed data URL"]),
        ("data:image/png,abc", {}, ["malformed data URL"]),
        ("/nonexistent/cat.png", {}, ["file not found", "/nonexistent/cat.png"]),
        (12345, {}, ["unsupported type int"]),
    ],
    ids=[
        "zero",
        "truncated",
        "random",
        "bomb-error",
        "bomb-warning",
        "max-pixels",
        "max-pixels-set",
        "bad-base64",
        "not-image-url",
        "not-base64-url",
        "missing",
        "bad-type",
    ],
)
def test_bad_images_raise_image_error_quickly(image, kwargs, words):
    start = time.perf_counter()
    for call in (load_image, preprocess_image):
        with pytest.raises(ImageError) as info:
            call(image, index=2, **kwargs)
        message = str(info.value)
        assert message.startswith("image 2: ") and all(w in message for w in words), message
    assert time.perf_counter() - start < 1.0  # nothing was decoded or allocated at full size


def test_pixel_budget_bounds_the_pixels_decoded_at_once(monkeypatch):
    """Eight threads tile 3-megapixel images under a 7-megapixel budget: never more than two decode
    at once, every one gets its tiles, and the tiles equal those made without a budget."""
    import concurrent.futures
    import threading

    from herd import images as preprocess
    from herd.images import ImageBusy, PixelBudget

    image = Image.new("RGB", (2000, 1500), (10, 200, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    budget, lock, now, most = PixelBudget(7_000_000), threading.Lock(), [0], [0]
    real = preprocess._to_tensor

    def counted(rgb):  # runs while an image's pixels are decoded
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.05)
        try:
            return real(rgb)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(preprocess, "_to_tensor", counted)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: preprocess_image(png, budget=budget), range(8)))
    assert most[0] == 2 and budget.used == 0
    alone, _ = preprocess_image(png)
    assert all(torch.equal(tiles, alone) for tiles, _ in results)

    # No room within the wait: a refusal that is not the image's fault; one image over the budget runs alone.
    small = PixelBudget(1_000_000, wait_s=0.2)
    with small.hold(600_000):
        with pytest.raises(ImageBusy, match="image 0: 600,000 pixels are being decoded"):
            preprocess_image(png, budget=small)
    assert preprocess_image(png, budget=small)[0].shape == alone.shape and small.used == 0


def test_image_errors_show_no_object_addresses():
    with pytest.raises(ImageError) as e:
        preprocess_image(b"just some text, not an image")
    assert " at 0x" not in str(e.value) and "image 0" in str(e.value)
