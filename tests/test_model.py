"""The fast paths against their slow, obviously-right references, and model-level invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.config import MoEConfig
from herd.model.attention import Attention, chunked_causal_mask, temperature_scale
from herd.model.layers import rope_inv_freq
from herd.model.moe import MoE
from herd.model.transformer import TextModel
from tests.conftest import randomize, tiny_text


@pytest.mark.parametrize("T", [5, 8, 9, 37, 64])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)])
def test_chunk_folding_equals_masked_attention(T, heads):
    """Block-diagonal folding == SDPA with the explicit chunked mask, at and across chunk edges."""
    cfg = tiny_text(n_heads=heads[0], n_kv_heads=heads[1])
    attn = Attention(cfg, layer=0)
    assert attn.use_rope and attn.chunk == 8
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(2, heads[0], T, 16, generator=gen)
    k, v = (torch.randn(2, heads[1], T, 16, generator=gen) for _ in range(2))
    pos = torch.arange(T)
    mask = chunked_causal_mask(pos, pos, 8)
    rep = heads[0] // heads[1]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    torch.testing.assert_close(attn._attend(q, k, v), ref, rtol=1e-5, atol=1e-6)


def test_chunked_mask_is_not_a_sliding_window():
    m = chunked_causal_mask(torch.arange(12), torch.arange(12), 4)
    assert m[4].tolist() == [False] * 4 + [True] + [False] * 7  # first query of chunk 1 sees only itself
    assert m[7].tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert m[3].tolist() == [True] * 4 + [False] * 8


def test_temperature_is_one_below_floor_scale():
    s = temperature_scale(torch.arange(3 * 8192), 8192.0, 0.1)
    assert torch.all(s[:8191] == 1.0)
    assert s[8191].item() == pytest.approx(1 + 0.1 * torch.log(torch.tensor(2.0)).item())
    assert torch.all(s[1:] >= s[:-1])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_dispatch_equals_dense_reference(top_k):
    moe = randomize(MoE(32, MoEConfig(num_experts=5, top_k=top_k, expert_dim=24)), seed=top_k)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(0))
    fast = moe(x)
    moe.dense_reference = True
    torch.testing.assert_close(fast, moe(x), rtol=1e-5, atol=1e-5)


def test_moe_score_scales_the_input_not_the_output():
    """expert(x * s) differs from s * expert(x) for SwiGLU; check the former against a hand computation."""
    moe = randomize(MoE(8, MoEConfig(num_experts=2, top_k=1, expert_dim=6)), seed=1)
    x = torch.randn(1, 1, 8)
    logits = moe.router(x[0])
    e = int(logits.argmax())
    s = torch.sigmoid(logits[0, e])
    w = moe.experts
    xs = x[0] * s
    routed = (F.silu(xs @ w.w1[e].T) * (xs @ w.w3[e].T)) @ w.w2[e].T
    torch.testing.assert_close(moe(x)[0], moe.shared_expert(x[0]) + routed)


def test_scout_inv_freq_matches_llama3_rule():
    from herd.config import PRESETS

    t = PRESETS["scout"].text
    base = rope_inv_freq(t.head_dim, t.rope_theta, None)
    scaled = rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling)
    wavelen = 2 * torch.pi / base
    torch.testing.assert_close(scaled[wavelen < 8192], base[wavelen < 8192])
    torch.testing.assert_close(scaled[wavelen > 8192], base[wavelen > 8192] / 16)


@pytest.mark.parametrize("name", ["scout", "maverick", "behemoth"])
def test_big_presets_build_on_meta_without_memory(name):
    from herd.config import PRESETS

    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        m = TextModel(PRESETS[name].text)
    n = sum(p.numel() for p in m.parameters())
    assert n == PRESETS[name].text.param_count()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: < 200 MB growth


def test_layer_kinds_follow_config_not_hardcoded():
    cfg = tiny_text("tiny-interleaved", n_layers=6, uses_rope=(False, True, True, True, True, False),
                    is_moe=(True, True, False, False, True, False))
    m = TextModel(cfg)
    assert [layer.attention.use_rope for layer in m.layers] == list(cfg.uses_rope)
    assert [isinstance(layer.feed_forward, MoE) for layer in m.layers] == list(cfg.is_moe)
