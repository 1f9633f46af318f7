"""The int8 KV cache (int8 values, a float32 scale per row, KV head and token): its rounding, cached
generation against the float cache, its bytes, rows joining and leaving, and its options."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.config import PRESETS
from herd.engine.cache import (KVCache, dequantize_int8, entry_bytes, kv_cache_bytes, quantize_int8,
                               resolve_kv_dtype)
from herd.engine.generate import Engine
from herd.model.attention import temperature_scale

PROMPT = "The llama is a domesticated South American camelid. " * 3  # ~40 tokens: 5 chunks of 8
# An int8 cache moves the tiny random models' logits by up to ~2% of their largest one (measured
# 1.7%): each entry is within half a step (absmax / 254) of its value, over 4 layers of random weights.
INT8_REL = 3e-2


def _gap(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def test_int8_round_trip_is_within_half_a_step():
    """Every value comes back within scale / 2 (scale = its vector's absmax / 127); the largest one of
    each vector exactly; an all-zero vector as zeros; and once more rounded in a half-precision read."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 64, generator=g) * 10 ** torch.empty(3, 5, 2, 1).uniform_(-4, 4, generator=g)
    x[0, 0, 0] = 0.0
    x[1, 2, 1, 7] = 1e3 * x[1, 2, 1].abs().max()  # an outlier takes the whole vector's scale
    values, scales = quantize_int8(x)
    assert values.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == x.shape[:3]
    assert int(values.abs().max()) == 127 and int(values.min()) >= -127
    back = dequantize_int8(values, scales, torch.float32)
    assert ((back - x).abs() <= scales[..., None] * (0.5 + 1e-6)).all()
    top = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, top), x.gather(-1, top), rtol=1e-6, atol=0)
    assert (back[0, 0, 0] == 0).all()
    half = dequantize_int8(values, scales, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert ((half.float() - x).abs() <= scales[..., None] * 0.5 * (1 + 1e-6) + x.abs() * 2 ** -8).all()


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-interleaved", "tiny-dense"])
def test_int8_cache_stays_close_to_the_float_cache(name):
    """A float32 model over 5+ attention chunks, temperature tuning active: prefill in segments of 3
    (ending mid-chunk and at chunk boundaries), then 30 decode steps fed the same tokens; every step's
    logits with the int8 cache are within INT8_REL of the float32 cache's, and greedy generation with
    the int8 cache picks the float one's tokens."""
    llm = herd.load(name, seed=7)
    cfg = llm.config.text
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    assert len(ids) > 4 * cfg.attention_chunk_size
    assert float(temperature_scale(torch.tensor(len(ids)), cfg.floor_scale, cfg.attn_scale)) > 1.1
    floats = Engine(llm.model, rows=1, max_len=len(ids) + 30, prefill_chunk=3, kv_dtype=torch.float32)
    int8 = Engine(llm.model, rows=1, max_len=len(ids) + 30, prefill_chunk=3, kv_dtype="int8")
    assert int8.cache.k[0].dtype == torch.float32 and int8.cache.k[0].data.dtype == torch.int8  # read as float32
    a, b = floats.prefill(0, ids), int8.prefill(0, ids)
    greedy, gaps = [], [_gap(b, a)]
    for _ in range(30):  # both fed the float cache's greedy tokens
        greedy.append(int(a.argmax()))
        a, b = floats.decode([greedy[-1]])[0], int8.decode([greedy[-1]])[0]
        gaps.append(_gap(b, a))
    assert max(gaps) <= INT8_REL, max(gaps)
    llm.kv_dtype = "int8"
    out = llm.generate(ids, max_new_tokens=30).token_ids
    assert out == greedy[:len(out)] and len(out) >= 10


def test_int8_cache_bytes_and_layout():
    """int8 values plus a float32 scale per (token, KV head): (Dh + 4) / (2 Dh) of a bf16 cache, as
    allocated; the chunked layers still keep one chunk."""
    scout = PRESETS["scout"].text
    bf16, int8 = kv_cache_bytes(scout, 131072), kv_cache_bytes(scout, 131072, dtype="int8")
    assert int8 * 2 * 128 == bf16 * (128 + 4)  # ratio 0.516
    assert entry_bytes(scout, torch.int8) == 2 * 8 * (128 + 4)
    llm = herd.load("tiny-moe")
    cfg = llm.config.text
    cache = KVCache(cfg, 2, 100, "int8", "cpu")
    assert cache.nbytes == kv_cache_bytes(cfg, 100, 2, torch.int8)
    entries = sum(8 if rope else 100 for rope in cfg.uses_rope)  # chunk 8; the NoPE layers keep all 100
    assert cache.nbytes == 2 * entries * 2 * cfg.n_kv_heads * (cfg.head_dim + 4)
    for i, k in enumerate(cache.k):
        capacity = 8 if cfg.uses_rope[i] else 100
        assert k.data.shape == (2, cfg.n_kv_heads, capacity, cfg.head_dim) and k.scales.shape == (2, 2, capacity)
    llm.kv_dtype = "int8"
    assert llm.kv_dtype == torch.int8 and llm.kv_cache_bytes(100) == kv_cache_bytes(cfg, 100, 1, torch.int8)
    assert llm.memory(100)["kv_cache"] == kv_cache_bytes(cfg, 100, 1, torch.int8)
    plan = herd.load("scout", device="meta", dtype="bfloat16", kv_dtype="int8")
    assert plan.memory(131072)["kv_cache"] == int8


def test_info_counts_the_int8_cache(capsys):
    from herd.cli import main
    assert main(["info", "scout", "--context", "131072", "--kv-dtype", "int8"]) == 0
    out = capsys.readouterr().out
    int8 = kv_cache_bytes(PRESETS["scout"].text, 131072, dtype=torch.int8)
    assert "KV cache in int8 with float32 scales" in out and f"KV cache {int8 / 2**30:.2f} GiB" in out
    assert main(["info", "scout", "--context", "131072", "--kv-dtype", "bfloat16"]) == 0
    assert "KV cache 7.12 GiB (57.0 KiB per token)" in capsys.readouterr().out


def test_rows_join_and_leave_with_an_int8_cache():
    """A batch of prompts of different lengths (rows leave as they end, the last row moving into the
    gap) gives each prompt's own tokens; a moved row carries its values and scales."""
    llm = herd.load("tiny-moe", kv_dtype="int8")
    prompts = ["Hi", PROMPT, [{"role": "user", "content": "Tell me about llamas."}], "A llama"]
    batch = llm.generate(prompts, max_new_tokens=12, stop=["zzz"])
    for p, b in zip(prompts, batch):
        assert llm.generate(p, max_new_tokens=12).token_ids == b.token_ids
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    moved, alone = (Engine(llm.model, rows=3, max_len=len(ids) + 1, kv_dtype="int8") for _ in range(2))
    moved.prefill(2, ids)
    moved.move_row(2, 0)
    assert moved.cache.lengths == [len(ids), 0, 0]
    for k in moved.cache.k:
        n = min(len(ids), k.data.shape[2])
        assert torch.equal(k.data[0, :, :n], k.data[2, :, :n]) and torch.equal(k.scales[0, :, :n], k.scales[2, :, :n])
    alone.prefill(0, ids)
    assert torch.equal(moved.decode([ids[-1]]), alone.decode([ids[-1]]))


def test_scoring_through_the_cache():
    """herd.evaluate.quality(cached=True) reads every window back from each model's cache: a float32
    cache scores as the full forwards do; an int8 one differs a little, and is reported as such."""
    from herd.evaluate import quality

    llm = herd.load("tiny-moe", seed=3)
    ids = llm.tokenizer.encode(PROMPT * 2, bos=True)
    full = quality(llm, ids, window=40, progress=False)
    cached = quality(llm, ids, llm, window=40, progress=False, cached=True)
    assert cached.perplexity == pytest.approx(full.perplexity, rel=1e-5)
    assert cached.mean_kl == pytest.approx(0, abs=1e-6)
    int8 = herd.load("tiny-moe", seed=3, kv_dtype="int8")
    q = quality(int8, ids, llm, window=40, progress=False, cached=True)
    assert 0 < q.mean_kl < 0.05 and q.reference_perplexity == pytest.approx(full.perplexity, rel=1e-5)


@pytest.mark.parametrize("bad", ["int4", "fp8", torch.int16, torch.float64, None])
def test_an_unknown_kv_dtype_is_named(bad):
    message = r"kv_dtype must be one of float32, bfloat16, float16, int8 \(a name or a torch dtype\); got"
    with pytest.raises(ValueError, match=message):
        resolve_kv_dtype(bad)
    llm = herd.load("tiny-dense")
    with pytest.raises(ValueError, match=message):
        llm.kv_dtype = bad
    if bad is not None:  # None is herd.load's and Engine's "the default"
        with pytest.raises(ValueError, match=message):
            herd.load("tiny-dense", kv_dtype=bad)
        with pytest.raises(ValueError, match=message):
            Engine(llm.model, rows=1, max_len=8, kv_dtype=bad)
    assert llm.kv_dtype == torch.float32  # unchanged


def test_kv_dtype_names_and_the_cli_choices(capsys):
    from herd.cli import main
    assert [resolve_kv_dtype(n) for n in ("bf16", "fp32", "int8", torch.int8)] == \
        [torch.bfloat16, torch.float32, torch.int8, torch.int8]
    assert herd.load("tiny-dense", kv_dtype="auto").kv_dtype == torch.float32
    with pytest.raises(ValueError, match="read back in a float dtype"):
        KVCache(PRESETS["tiny-dense"].text, 1, 8, "int8", "cpu", read_dtype=torch.int8)
    with pytest.raises(SystemExit):
        main(["info", "scout", "--kv-dtype", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_perplexity_compares_an_int8_cache_with_the_default_one(tmp_path, capsys):
    from herd.cli import main
    text = tmp_path / "story.txt"
    text.write_text("Mia went to the park with her red ball. She saw a big dog. " * 20)
    assert main(["perplexity", "--kv-dtype", "int8", "--compare", "--text", str(text), "--window", "128"]) == 0
    out = capsys.readouterr().out
    assert "(through a KV cache in int8)" in out and "default KV cache" in out and "top-1 agreement" in out
    kl = float(out.split("mean KL divergence ")[1].split()[0])
    assert 0 < kl < 0.005
