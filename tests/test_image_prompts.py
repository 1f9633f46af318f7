"""Images through the chat format: content parts -> image tokens + tiles -> logits, limits and bad input."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import herd
from herd.tokenizer.chat_format import image_tokens
from herd.images import ImageError


def photo(name: str) -> Path:
    """A real photo shipped in the llama-models package (dog.jpg, pasta.jpeg)."""
    spec = importlib.util.find_spec("llama_models")
    return Path(spec.submodule_search_locations[0]) / "resources" / name


def png_bytes(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def llm():
    return herd.load("tiny-moe", max_images=64)


def test_images_land_where_the_content_parts_put_them(llm):
    tok = llm.tokenizer
    messages = [
        {"role": "system", "content": "You compare pictures."},
        {"role": "user", "content": [
            {"type": "text", "text": "First:"},
            {"type": "image", "image": photo("dog.jpg")},
            {"type": "text", "text": "and second:"},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(120, 40))}}]},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": [{"type": "image", "image": photo("pasta.jpeg").read_bytes()},
                                     {"type": "text", "text": "Which is food?"}]},
    ]
    ids = tok.apply_chat_template(messages)
    assert len(ids.image_grids) == 3 and ids.pixel_values.shape[1:] == (3, 56, 56)
    tiles = [r * c + (r * c > 1) for r, c in ids.image_grids]
    assert ids.pixel_values.shape[0] == sum(tiles)
    # The same prompt assembled by hand: text pieces and image layouts in content order.
    enc = tok.encode
    head = lambda role: [tok.token_id("<|header_start|>"), *enc(role), tok.token_id("<|header_end|>"), *enc("\n\n")]
    img = [image_tokens(tok, g, llm.tiler.tokens_per_tile) for g in ids.image_grids]
    expected = [tok.bos_id, *head("system"), *enc("You compare pictures."), tok.eot_id,
                *head("user"), *enc("First:"), *img[0], *enc("and second:"), *img[1], tok.eot_id,
                *head("assistant"), *enc("Noted."), tok.eot_id,
                *head("user"), *img[2], *enc("Which is food?"), tok.eot_id, *head("assistant")]
    assert ids.ids == expected
    # Each image's tiles are its own preprocessing, in prompt order.
    first, grid = llm.preprocess_image(photo("dog.jpg"))
    assert grid == ids.image_grids[0] and torch.equal(ids.pixel_values[:tiles[0]], first)
    logits = llm.logits([ids.ids], pixel_values=ids.pixel_values)
    assert logits.shape == (1, len(ids.ids), 202_048) and torch.isfinite(logits).all()
    assert torch.equal(llm.logits(ids), logits)  # a ChatPrompt brings its own images


@pytest.mark.slow
def test_a_prompt_with_48_images_runs(llm):
    sizes = [(40 + 7 * i, 30 + 11 * (i % 9)) for i in range(48)]  # aspect ratios from ~1:2 to ~3:1
    content = [{"type": "image", "image": Image.new("RGB", s, (i * 5, 100, 200 - i * 4))} for i, s in enumerate(sizes)]
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": content + [
        {"type": "text", "text": "Describe all of them."}]}])
    assert len(ids.image_grids) == 48
    assert len({g for g in ids.image_grids}) > 3  # different grids
    logits = llm.logits([ids.ids], pixel_values=ids.pixel_values)
    assert torch.isfinite(logits).all()


def test_text_only_prompts_carry_no_pixels(llm):
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids.pixel_values is None and ids.image_grids == ()


def test_too_many_images_is_refused_before_any_decoding():
    small = herd.load("tiny-moe", max_images=2)
    bad = b"not an image"  # would fail decoding, but the count is checked first
    content = [{"type": "image", "image": bad}] * 3
    with pytest.raises(ValueError, match="image 2: the prompt has 3 images, more than the limit of 2"):
        small.tokenizer.apply_chat_template([{"role": "user", "content": content}])


def test_bad_images_name_their_index(llm):
    ok = {"type": "image", "image": png_bytes(30, 30)}
    for bad, message in [
        (b"\x89PNG\r\n\x1a\n garbage", "image 1"),
        (png_bytes(300, 300)[:200], "image 1"),  # truncated
        ("data:image/png;base64,@@@", "image 1"),
    ]:
        with pytest.raises(ImageError, match=message):
            llm.tokenizer.apply_chat_template([{"role": "user", "content": [ok, {"type": "image", "image": bad}]}])


def test_pixel_limit_is_configurable():
    strict = herd.load("tiny-moe", max_pixels=1_000)
    with pytest.raises(ImageError, match=r"image 0: .*1,?000"):
        strict.preprocess_image(png_bytes(50, 50))


def test_max_tiles_is_configurable():
    few = herd.load("tiny-moe", max_tiles=2)
    tiles, (rows, cols) = few.preprocess_image(png_bytes(400, 100))
    assert rows * cols <= 2 and tiles.shape[0] == rows * cols + (rows * cols > 1)
