"""Shared test helpers: tiny random reference models from transformers, written as real checkpoints."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from herd.config import PRESETS, TextConfig, to_hf_text_config

# Parity bound of the issues: max |Δlogit| <= 1e-4 * max |logit| (float32).
REL_TOL = 1e-4


# Worst relative gap per test, printed at the end of the run (figures for parity reports).
GAPS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if GAPS:
        terminalreporter.section("logit gaps (max |Δlogit| / max |logit|, worst per test)")
        for test, gap in sorted(GAPS.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{gap:9.2e}  {test}")


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> float:
    """Assert the relative max-abs gap and return it (for messages and reports)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    gap = (ours.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert gap <= rel, f"max |Δlogit| / max |logit| = {gap:.3g} > {rel}"
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    GAPS[test] = max(GAPS.get(test, 0.0), gap)
    return gap


def tiny_text(name: str = "tiny-moe", **changes) -> TextConfig:
    """A tiny preset's text config with fields replaced (re-validated)."""
    return dataclasses.replace(PRESETS[name].text, **changes)


def hf_text_config(cfg: TextConfig):
    from transformers import Llama4TextConfig

    c = Llama4TextConfig(**to_hf_text_config(cfg))
    c._attn_implementation = "eager"  # the plainest reference path
    c.use_cache = False  # full forwards only (its cache also breaks on attention_chunk_size=None)
    return c


def tiny_vision_dict() -> dict:
    """transformers' vision_config of herd's TINY_VISION: 56-pixel tiles, 4 vectors per tile, 2 layers."""
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                projector_output_dim=64, pixel_shuffle_ratio=0.5)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Non-trivial random weights (norm weights too) so every code path moves the logits."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def hf_reference(cfg: TextConfig, seed: int = 0, multimodal: bool = False):
    """A random transformers Llama4ForCausalLM (or ...ForConditionalGeneration) of the same shape."""
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    if multimodal:
        full = Llama4Config(text_config=to_hf_text_config(cfg), vision_config=tiny_vision_dict())
        full.text_config._attn_implementation = "eager"
        full._attn_implementation = "eager"
        model = Llama4ForConditionalGeneration(full)
    else:
        model = Llama4ForCausalLM(hf_text_config(cfg))
    return randomize(model, seed)


@pytest.fixture
def write_hf(tmp_path):
    """write_hf(cfg, ...) -> (folder, reference model): a real HF checkpoint written by transformers."""
    count = [0]

    def make(cfg: TextConfig, seed: int = 0, multimodal: bool = False, shard: str | None = None):
        ref = hf_reference(cfg, seed, multimodal)
        count[0] += 1
        folder = tmp_path / f"hf{count[0]}"
        ref.save_pretrained(folder, max_shard_size=shard or "50GB")
        return folder, ref

    return make
