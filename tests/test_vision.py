"""The vision encoder and early fusion against transformers' Llama4ForConditionalGeneration (float32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.checkpoint.errors import CheckpointError
from herd.checkpoint.meta import to_meta
from herd.model.vision import pixel_shuffle
from herd.tokenizer.chat_format import image_tokens
from tests.conftest import assert_logits_close, tiny_text

S = 56  # tiny tiles (see tiny_vision_dict): 4 <|patch|> tokens per tile


def prompt(tok, grids, text_seed=0, filler=6, length=None):
    """<|begin_of_text|>, then text and one image per grid, alternating, text padded to ``length``;
    returns the ids and the number of tiles the images need."""
    gen = torch.Generator().manual_seed(text_seed)
    ids, tiles = [tok.bos_id], 0
    for grid in grids:
        ids += torch.randint(0, 200_000, (filler,), generator=gen).tolist()
        ids += image_tokens(tok, grid, 4)
        tiles += grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0)
    ids += torch.randint(0, 200_000, (max(filler, (length or 0) - len(ids)),), generator=gen).tolist()
    return ids, tiles


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.conftest import hf_reference

    ref = hf_reference(tiny_text("tiny-interleaved"), seed=4, multimodal=True)
    folder = tmp_path_factory.mktemp("mm") / "hf"
    ref.save_pretrained(folder)
    return folder, ref


CASES = {"one-tile": [(1, 1)], "multi-tile-2x3": [(2, 3)], "three-images": [(1, 1), (3, 1), (1, 2)]}


@pytest.mark.parametrize("name", CASES)
def test_image_logits_match_transformers(name, checkpoint):
    folder, ref = checkpoint
    llm = herd.load(folder, progress=False)
    assert llm.vision is not None
    ids, n_tiles = prompt(llm.tokenizer, CASES[name])
    pixels = torch.randn(n_tiles, 3, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    ours = llm.logits([ids], pixel_values=pixels)
    assert_logits_close(ours, expected)
    # The image must matter: other pixels, other logits.
    assert (llm.logits([ids], pixel_values=pixels.roll(1, dims=-1)) - ours).abs().max() > 1e-3


def test_batch_with_different_image_counts_matches_one_by_one(checkpoint):
    """Batch rows with 2, 0 and 1 images: tiles are given in prompt order across the batch."""
    folder, _ = checkpoint
    llm = herd.load(folder, progress=False)
    rows = [prompt(llm.tokenizer, g, text_seed=i, length=48) for i, g in enumerate([[(1, 1), (2, 1)], [], [(1, 2)]])]
    assert len({len(ids) for ids, _ in rows}) == 1  # equal lengths: no padding needed
    pixels = [torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(10 + i)) for i, (_, n) in enumerate(rows)]
    batch = llm.logits([ids for ids, _ in rows], pixel_values=torch.cat(pixels))
    for i, (ids, n) in enumerate(rows):
        alone = llm.logits([ids], pixel_values=pixels[i] if n else None)
        assert_logits_close(batch[i:i + 1], alone, rel=1e-5)


def test_pixel_shuffle_order():
    """A 4×4 grid of patch ids: each merged vector holds a 2×2 block, in the references' channel order."""
    x = torch.arange(16.0).view(1, 16, 1)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 4, 4)
    # Block (0, 0) holds patches 0, 1, 4, 5: its top row's pair, then its bottom row's pair.
    assert out[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert out[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert out[0, 2].tolist() == [8.0, 9.0, 12.0, 13.0]


def test_meta_format_vision_weights_give_the_same_logits(checkpoint, tmp_path):
    """The same weights written under Meta's names (vision_embeddings.*, vision_projection) load alike."""
    from herd.config import to_meta_params

    folder, _ = checkpoint
    llm = herd.load(folder, progress=False)
    (shard,) = to_meta(llm.model.state_dict(), llm.config.text, fused=True)
    enc, adapter = "vision_embeddings.vision_encoder.", "vision_embeddings.vision_adapter.mlp."
    v = llm.vision.state_dict()
    names = {"patch_embed.weight": enc + "conv1._linear.weight", "class_token": enc + "class_embedding",
             "pos_embed": enc + "positional_embedding_vlm", "adapter_fc1.weight": adapter + "c_fc.weight",
             "adapter_fc2.weight": adapter + "c_proj.weight", "projector.weight": "vision_projection.weight",
             "norm_pre.weight": enc + "ln_pre.weight", "norm_pre.bias": enc + "ln_pre.bias",
             "norm_post.weight": enc + "ln_post.weight", "norm_post.bias": enc + "ln_post.bias"}
    layer = {"norm1": "ln_1", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             **{f"attn.w{x}": f"attn.w{x}" for x in "qkvo"}}
    for i in range(llm.config.vision.n_layers):
        for a, b in layer.items():
            for p in ("weight", "bias"):
                names[f"layers.{i}.{a}.{p}"] = f"{enc}transformer.resblocks.{i}.{b}.{p}"
    assert set(names) == set(v)
    shard |= {names[k]: t.clone() for k, t in v.items()}
    meta_folder = tmp_path / "meta"
    meta_folder.mkdir()
    (meta_folder / "params.json").write_text(json.dumps(to_meta_params(llm.config)))
    torch.save(shard, meta_folder / "consolidated.00.pth")
    again = herd.load(meta_folder, progress=False)
    assert again.config.vision == llm.config.vision
    ids, n = prompt(llm.tokenizer, [(2, 2)])
    pixels = torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(2))
    assert_logits_close(again.logits([ids], pixel_values=pixels), llm.logits([ids], pixel_values=pixels), rel=1e-6)


def test_vision_can_be_skipped_and_text_only_checkpoints_refuse_images(checkpoint):
    folder, _ = checkpoint
    text_only = herd.load(folder, progress=False, vision=False)
    assert text_only.vision is None
    ids, n = prompt(text_only.tokenizer, [(1, 1)])
    # The checkpoint has an encoder: the refusal says it was left out, not that there is none.
    with pytest.raises(ValueError, match="loaded with vision=False"):
        text_only.logits([ids], pixel_values=torch.zeros(n, 3, S, S))
    with pytest.raises(ValueError, match="image 0: .*loaded with vision=False; load it with vision=True"):
        text_only.tokenizer.apply_chat_template([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    dense = herd.load("tiny-dense")
    with pytest.raises(ValueError, match="image 0: .*no vision encoder"):
        dense.preprocess_image(b"")


def test_patch_count_and_pixel_shape_mismatches(checkpoint):
    folder, _ = checkpoint
    llm = herd.load(folder, progress=False)
    ids, n = prompt(llm.tokenizer, [(2, 2)])
    with pytest.raises(ValueError, match=r"20 <\|patch\|> tokens but pixel_values has 4 tiles × 4 = 16"):
        llm.logits([ids], pixel_values=torch.zeros(4, 3, S, S))
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \[tiles, 3, 56, 56\]"):
        llm.logits([ids], pixel_values=torch.zeros(n, 3, 336, 336))
    with pytest.raises(ValueError, match=r"20 <\|patch\|> tokens but no pixel_values"):
        llm.logits([ids])


def test_missing_vision_tensor_is_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(broken / "model.safetensors")
    del sd["vision_model.model.layers.1.mlp.fc2.bias"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'vision_model.model.layers.1.mlp"):
        herd.load(broken)
    assert herd.load(broken, vision=False).vision is None  # text-only use still works


def test_save_pretrained_with_vision_loads_in_transformers(checkpoint, tmp_path):
    from transformers import Llama4ForConditionalGeneration

    folder, _ = checkpoint
    llm = herd.load(folder, progress=False)
    out = llm.save_pretrained(tmp_path / "export")
    back = Llama4ForConditionalGeneration.from_pretrained(out).eval()
    ids, n = prompt(llm.tokenizer, [(1, 2)])
    pixels = torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = back(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert_logits_close(llm.logits([ids], pixel_values=pixels), expected)
    again = herd.load(out, progress=False)
    assert again.config.vision == llm.config.vision
    assert all(torch.equal(a, b) for a, b in zip(again.vision.state_dict().values(), llm.vision.state_dict().values()))
