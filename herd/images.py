"""Images in any form -> Llama 4 pixel tiles, with Pillow and torch only (no torchvision).

The ground truth is Meta's llama_models/llama4 (chat_format.py ChatFormat._encode_content, which
calls preprocess.py VariableSizeImageTransform with resize_to_max_canvas=False and, for more
than one tile, ResizeNormalizeImageTransform for the thumbnail); transformers'
Llama4ImageProcessor implements the same steps. For an image of H x W pixels:

1. pick the canvas of rows x cols tiles (rows * cols <= max_tiles) that needs the least
   upscaling, or failing that the least downscaling; among equal scales the smallest canvas;
2. resize without distortion to fit that canvas, but never beyond the image's own size unless a
   side is shorter than one tile (bilinear with antialiasing, on uint8 pixels);
3. pad with black (0 before normalisation, so -1 after) at the bottom and right;
4. rescale to [0, 1] and normalise with mean 0.5 / std 0.5, giving values in [-1, 1];
5. cut into rows * cols tiles, row-major;
6. when there is more than one tile, append the global thumbnail: the original image squashed
   (aspect ratio not kept) to one tile, resized and normalised the same way.

Shape legend: N tiles, C channels (3, RGB), H height, W width, T tile size.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import ctypes
import ctypes.util
import functools
import io
import math
import os
import re
import threading
import time
import warnings
from fractions import Fraction

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from herd.config import VisionConfig

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_TILES = 16

_ImageLike = Image.Image | str | os.PathLike | bytes | bytearray | memoryview

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageError(ValueError):
    """An image that cannot be used; the message names the image's index in the prompt."""


def load_image(image: _ImageLike, *, index: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
               budget: PixelBudget | None = None) -> Image.Image:
    """Decode `image` (PIL image, path, bytes or data: URL) into an upright RGB image.

    The pixel count is checked on the header before any pixel is decoded (decompression bombs).
    """
    with _decoded(image, index, max_pixels, budget) as rgb:
        return rgb


class ImageBusy(RuntimeError):
    """Pixels being decoded at once reached the budget and did not free up in time (not the image's fault)."""


class PixelBudget:
    """Bounds the pixels that threads decode at once: an image takes its share (width x height) before
    its pixels are decoded and gives it back once its tiles exist, so memory for images follows this
    budget rather than the number of threads. An image larger than the whole budget runs alone."""

    def __init__(self, pixels: int, wait_s: float = 10.0):
        if pixels < 1 or wait_s < 0:
            raise ValueError(f"a pixel budget needs pixels >= 1 and wait_s >= 0, got {pixels} and {wait_s}")
        self.limit, self.wait_s, self.used = pixels, wait_s, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int, index: int = 0):
        deadline = time.monotonic() + self.wait_s
        with self.cond:
            while self.used and self.used + pixels > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ImageBusy(f"image {index}: {self.used:,} pixels are being decoded (budget {self.limit:,}); "
                                    f"no room for its {pixels:,} within {self.wait_s:g} s")
                self.cond.wait(left)
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()


def map_large_buffers(threshold: int = 1 << 20) -> None:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own mmap, which goes
    back to the system when freed. By default glibc raises that threshold (up to 32 MB) after the
    first large free; an image's temporaries (tens of MB) then land in per-thread heaps, whose free
    tops stay resident and which malloc_trim does not shrink (docs/serving.md). Process-wide; a no-op
    where libc is not glibc."""
    try:
        _libc().mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def best_grid(height: int, width: int, tile_size: int = 336, max_tiles: int = DEFAULT_MAX_TILES) -> tuple[int, int]:
    """The (rows, cols) tile canvas the references choose for an image of height x width pixels.

    Meta's get_best_fit: the scale of a canvas is the largest factor that fits the image in it
    without distortion; take the smallest scale >= 1 if any canvas allows upscaling, else the
    largest scale; among canvases with that scale, the one with the fewest tiles (it is unique).
    Scales are compared exactly; the references compare float32 quotients, which can only tie
    differently for sides of millions of pixels.
    """
    if height < 1 or width < 1 or tile_size < 1 or max_tiles < 1:
        raise ValueError(f"need positive sizes, got {height=} {width=} {tile_size=} {max_tiles=}")
    scales = {
        (rows, cols): min(Fraction(rows * tile_size, height), Fraction(cols * tile_size, width))
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
    }
    upscales = [s for s in scales.values() if s >= 1]
    chosen = min(upscales) if upscales else max(scales.values())
    return min((grid for grid, s in scales.items() if s == chosen), key=lambda grid: grid[0] * grid[1])


def preprocess_image(
    image: _ImageLike,
    *,
    index: int = 0,
    tile_size: int = 336,
    max_tiles: int = DEFAULT_MAX_TILES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: PixelBudget | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image -> (pixel_values float32 (N, C, T, T) in [-1, 1], (rows, cols)).

    N = rows * cols, plus one global thumbnail as the last tile when rows * cols > 1. ``budget``
    bounds the pixels decoded at once across threads (see PixelBudget).
    """
    with _decoded(image, index, max_pixels, budget) as rgb:
        width, height = rgb.size
        rows, cols = best_grid(height, width, tile_size, max_tiles)
        image_CHW = _to_tensor(rgb)
        rgb.close()  # the tensor holds the pixels now; do not keep two copies of a large image
        del rgb

        new_h, new_w = _resized_size(height, width, rows, cols, tile_size)
        canvas_CHW = torch.zeros(3, rows * tile_size, cols * tile_size, dtype=torch.uint8)
        canvas_CHW[:, :new_h, :new_w] = _resize(image_CHW, new_h, new_w)
        # (C, rows*T, cols*T) -> (rows, cols, C, T, T) -> (rows*cols, C, T, T), row-major tiles
        tiles_NCHW = (
            canvas_CHW.view(3, rows, tile_size, cols, tile_size)
            .permute(1, 3, 0, 2, 4)
            .reshape(rows * cols, 3, tile_size, tile_size)
        )
        if rows * cols > 1:
            thumbnail_CHW = _resize(image_CHW, tile_size, tile_size)
            tiles_NCHW = torch.cat([tiles_NCHW, thumbnail_CHW[None]])
        del image_CHW
    # The same float32 ops as torchvision's ToTensor + Normalize(0.5, 0.5) in Meta's reference.
    return (tiles_NCHW.float() / 255 - 0.5) / 0.5, (rows, cols)


@contextlib.contextmanager
def _decoded(image: _ImageLike, index: int, max_pixels: int, budget: PixelBudget | None):
    """The image decoded to an upright RGB image, its pixels held in ``budget`` while inside."""
    with contextlib.ExitStack() as stack:
        opened = image if isinstance(image, Image.Image) else stack.enter_context(_open(image, index))
        width, height = opened.size
        if width == 0 or height == 0:
            raise ImageError(f"image {index}: zero-sized image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(f"image {index}: {width}x{height} = {width * height} pixels exceeds "
                             f"max_pixels={max_pixels}")
        if budget is not None:
            stack.enter_context(budget.hold(width * height, index))
        yield _decode(opened, index, owned=opened is not image)


def _open(image: str | os.PathLike | bytes | bytearray | memoryview, index: int) -> Image.Image:
    """Open lazily (header only), mapping every failure and Pillow's bomb guard to ImageError."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ImageError(f"image {index}: remote URLs are not fetched ({image[:60]}); pass the image's bytes, a "
                         "path or a data: URL")
    if isinstance(image, str) and image.startswith("data:"):
        source: str | os.PathLike | io.BytesIO = io.BytesIO(_data_url_bytes(image, index))
    elif isinstance(image, (str, os.PathLike)):
        source = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(image))
    else:
        raise ImageError(
            f"image {index}: unsupported type {type(image).__name__}; "
            "expected a PIL image, a path, bytes or a data:image/...;base64 URL"
        )
    try:
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are refusals.
        # (catch_warnings is process-wide; a concurrent thread may briefly see this filter.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except FileNotFoundError as exc:
        raise ImageError(f"image {index}: file not found: {image!s}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {index}: refused as a decompression bomb (Pillow's Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS}): {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"image {index}: not a readable image (no image format Pillow knows)") from exc
    except Exception as exc:  # any failure to parse untrusted bytes is a bad image
        raise ImageError(f"image {index}: not a readable image: {_plain(exc)}") from exc


def _plain(exc: Exception) -> str:
    """An exception's message without object reprs (``<_io.BytesIO object at 0x7f...>``): addresses
    help an attacker, not a user."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the image", str(exc))


def _data_url_bytes(url: str, index: int) -> bytes:
    """The payload of a data:image/...;base64,... URL."""
    header, comma, payload = url.partition(",")
    params = header[len("data:") :].split(";")
    if not comma or not params[0].startswith("image/") or params[-1] != "base64":
        raise ImageError(f"image {index}: malformed data URL; expected data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image {index}: bad base64 in data URL: {exc}") from exc


def _decode(image: Image.Image, index: int, owned: bool) -> Image.Image:
    """Decode every pixel, apply EXIF orientation, convert to RGB. An image this module opened
    (``owned``) is turned in place where Pillow allows: each copy of a 49-megapixel image is 147 MB."""
    try:
        # A full decode: truncated data raises here (LOAD_TRUNCATED_IMAGES stays off).
        image.load()
        upright = ImageOps.exif_transpose(image, in_place=owned) if owned else ImageOps.exif_transpose(image)
        return _to_rgb(image if upright is None else upright)
    except Exception as exc:  # decoder and conversion failures on untrusted data
        raise ImageError(f"image {index}: cannot decode image data: {_plain(exc)}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency is composited on white (as transformers' convert_to_rgb)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale 0..65535 to 0..255 instead.
        image = image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (C, H, W) (a channels-last view, which the resize kernel prefers)."""
    width, height = image.size
    image_HWC = torch.empty(height, width, 3, dtype=torch.uint8)
    step = max(1, (1 << 22) // (3 * width))  # rows per strip: ~4 MB of bytes at a time, not a whole copy
    for top in range(0, height, step):
        strip = image.crop((0, top, width, min(height, top + step))).tobytes()
        image_HWC[top:top + step] = torch.frombuffer(bytearray(strip), dtype=torch.uint8).view(-1, width, 3)
    return image_HWC.permute(2, 0, 1)


def _resize(image_CHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear antialiased resize of uint8 pixels, as torchvision does for both references.

    torch's uint8 kernel is the one torchvision's v2 resize uses on CPU (transformers); it differs
    from PIL's BILINEAR (Meta resizes PIL images) by at most 1, on about 0.1% of values.
    """
    if image_CHW.shape[-2:] == (height, width):
        return image_CHW
    resized = F.interpolate(image_CHW[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0]


def _resized_size(height: int, width: int, rows: int, cols: int, tile_size: int) -> tuple[int, int]:
    """(height, width) of the image resized without distortion into a rows x cols canvas.

    As both references with resize_to_max_canvas=False: a side is not upscaled past its own
    length unless it is shorter than one tile. The float64 arithmetic and floor are Meta's, so
    sizes match Meta's to the pixel; transformers does this in float32 (its canvas is a tensor)
    and is one pixel off for about 2% of sizes (e.g. 400x1200 with 4 tiles: 1007 wide, not 1008).
    """
    target_h = min(max(height, tile_size), rows * tile_size)
    target_w = min(max(width, tile_size), cols * tile_size)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


class ImageTiler:
    """Turns one image (PIL, path, bytes or data: URL) into tiles for a vision config, with limits."""

    def __init__(self, vision: VisionConfig, max_tiles: int = DEFAULT_MAX_TILES,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if max_tiles < 1 or max_pixels < 1:
            raise ValueError(f"max_tiles and max_pixels must be >= 1, got {max_tiles} and {max_pixels}")
        self.tile_size, self.max_tiles, self.max_pixels = vision.image_size, max_tiles, max_pixels
        side = vision.image_size // vision.patch_size
        self.tokens_per_tile = round(side * side * vision.pixel_shuffle_ratio ** 2)

        self.pixels = True  # False: layout only (see `layout_only`)
        self.budget: PixelBudget | None = None  # bounds pixels decoded at once across threads (herd serve)

    def __call__(self, image, index: int = 0) -> tuple[torch.Tensor | None, tuple[int, int]]:
        if not self.pixels:
            rgb = load_image(image, index=index, max_pixels=self.max_pixels, budget=self.budget)
            return None, best_grid(rgb.height, rgb.width, self.tile_size, self.max_tiles)
        return preprocess_image(image, index=index, tile_size=self.tile_size, max_tiles=self.max_tiles,
                                max_pixels=self.max_pixels, budget=self.budget)

    def layout_only(self) -> ImageTiler:
        """A copy that decodes and checks each image and plans its tiles but makes no pixels:
        (None, (rows, cols)). Enough to lay out a prompt's image tokens (tokenising training data,
        where the batches tile the images again), at a fraction of the cost."""
        tiler = copy.copy(self)
        tiler.pixels = False
        return tiler
