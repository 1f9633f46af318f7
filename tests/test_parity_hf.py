"""Logit parity with transformers' Llama 4, through herd's production loader (float32, CPU)."""

from __future__ import annotations

import zlib

import pytest
import torch

import herd
from herd.config import MoEConfig, RopeScaling
from tests.conftest import assert_logits_close, tiny_text

# Tiny presets: chunk 8 and floor_scale 4, so T=40 spans 5 attention chunks and the NoPE layer's
# temperature is above 1 for every position past 3.
T = 40

CASES = {
    "all-moe-top1-gqa2": tiny_text("tiny-moe"),
    "interleaved-top2-gqa2": tiny_text("tiny-interleaved"),
    "dense": tiny_text("tiny-dense"),
    "all-moe-top2-gqa1": tiny_text("tiny-moe", n_heads=4, n_kv_heads=4, moe=MoEConfig(4, 2, 64)),
    "interleaved-gqa4": tiny_text("tiny-interleaved", n_heads=8, n_kv_heads=2),
    "all-moe-gqa8": tiny_text("tiny-moe", n_heads=8, n_kv_heads=1),
    "scout-rope-scaling": tiny_text("tiny-moe", rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192)),
    "blended-rope-scaling": tiny_text("tiny-interleaved", rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
    "no-qk-norm-maverick-style": tiny_text("tiny-interleaved", use_qk_norm=False),
    "8-layers-two-nope": tiny_text("tiny-interleaved", n_layers=8, uses_rope=(True, True, True, False) * 2,
                                   is_moe=(False, True) * 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, write_hf):
    cfg = CASES[name]
    folder, ref = write_hf(cfg, seed=zlib.crc32(name.encode()) % 1000)
    llm = herd.load(folder, progress=False)
    assert llm.config.text == cfg  # config.json round trip through herd's reader
    ids = torch.randint(0, cfg.vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert_logits_close(llm.logits(ids), expected)


def test_null_attention_chunk_size_means_plain_causal(write_hf):
    """attention_chunk_size: null (Llama Guard 4 style). transformers cannot build that config, so the
    reference uses a chunk longer than the sequence, which is the same attention."""
    import json

    folder, ref = write_hf(tiny_text("tiny-moe", attention_chunk_size=4096), seed=7)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attention_chunk_size": None}))
    llm = herd.load(folder, progress=False)
    assert llm.config.text.attention_chunk_size is None
    ids = torch.randint(0, 202_048, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(ids).logits
    assert_logits_close(llm.logits(ids), expected)


def test_multimodal_layout_text_logits(write_hf):
    """A Llama4ForConditionalGeneration checkpoint: text weights under language_model.* (vision: test_vision.py)."""
    cfg = tiny_text("tiny-interleaved")
    folder, ref = write_hf(cfg, seed=3, multimodal=True)
    llm = herd.load(folder, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    assert_logits_close(llm.logits(ids), expected)


def test_sharded_checkpoint_with_index(write_hf):
    cfg = tiny_text("tiny-moe")
    folder, ref = write_hf(cfg, seed=4, shard="20MB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    llm = herd.load(folder, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids).logits
    assert_logits_close(llm.logits(ids), expected)


def _no_temperature(model):
    for layer in model.layers:
        layer.attention.temperature = False


def _no_chunks(model):
    for layer in model.layers:
        layer.attention.chunk = None


def _no_qk_norm(model):
    for layer in model.layers:
        layer.attention.use_qk_norm = False


def _unscaled_rope(model):
    from herd.model.layers import rope_inv_freq

    model.inv_freq = rope_inv_freq(model.cfg.head_dim, model.cfg.rope_theta, None)


@pytest.mark.parametrize("sabotage", [_no_temperature, _no_chunks, _no_qk_norm, _unscaled_rope])
def test_each_feature_moves_the_logits(sabotage, write_hf):
    """Guard against parity tests that cannot fail: removing any one Llama 4 feature breaks parity."""
    cfg = tiny_text("tiny-moe", rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192))
    folder, ref = write_hf(cfg, seed=5)
    llm = herd.load(folder, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids).logits
    assert_logits_close(llm.logits(ids), expected)
    sabotage(llm.model)
    with pytest.raises(AssertionError):
        assert_logits_close(llm.logits(ids), expected)
