"""A 128K-token prompt end to end on a small Llama 4, with its peak memory against what was accounted.

    python benchmarks/long_context.py [--tokens 131072] [--decode 16] [--budget-mb 256] [--dtype bfloat16]
                                      [--kv-dtype int8]

The model: width 256, 4 layers (every 4th NoPE), 4 heads of 64 / 2 KV heads, chunk 8192, 4 experts
of 256 top-1 + shared expert, the real 202,048 vocabulary, float32 (or ``--dtype``), random weights.
The prompt is prefilled in segments (512 tokens in float32, 2048 in bf16) into herd's KV cache (the
three chunked layers keep 8192 entries, the NoPE layer all of them; the cache in the dtype herd
picks, `cache_dtype`, or ``--kv-dtype``), then ``--decode`` tokens are generated. Reported: prefill and decode
speed, and peak resident memory (VmHWM, measured in this process) against
weights + accounted KV cache + a stated activation budget; the target is <= 1.5x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.config import MoEConfig, TextConfig, every, rope_layout  # noqa: E402
from herd.engine.cache import full_cache_bytes, kv_cache_bytes  # noqa: E402
from herd import kernels  # noqa: E402
from herd.engine.generate import Engine  # noqa: E402
from herd.model.init import init_weights  # noqa: E402
from herd.model.transformer import TextModel  # noqa: E402


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--budget-mb", type=float, default=256, help="stated activation budget")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "int8"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cfg = TextConfig(vocab_size=202_048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=1024,
                     uses_rope=rope_layout(4, 4), is_moe=every(4, 1), moe=MoEConfig(4, 1, 256),
                     attention_chunk_size=8192, max_seq_len=args.tokens + args.decode + 1)
    base = status("VmRSS")
    model = kernels.apply(init_weights(TextModel(cfg)).eval().to(dtype))
    # bf16 weights are made in float32 first: reset the high-water mark here so that float32 copy is not
    # counted (growth is still measured from `base`, before the model)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    max_len = args.tokens + args.decode + 1
    auto = kernels.cache_dtype(dtype, "cpu")
    kv = auto if args.kv_dtype == "auto" else getattr(torch, args.kv_dtype)
    engine = Engine(model, rows=1, max_len=max_len, kv_dtype=kv, kv_read_dtype=auto)
    accounted = kv_cache_bytes(cfg, max_len, 1, kv)
    assert engine.cache.nbytes == accounted
    prompt = torch.randint(0, 200_000, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"prefilling {args.tokens} tokens ...", file=sys.stderr)
    start = time.perf_counter()
    logits = engine.prefill(0, prompt)
    prefill_s = time.perf_counter() - start
    token = int(logits.argmax())
    start = time.perf_counter()
    for _ in range(args.decode):
        token = int(engine.decode([token])[0].argmax())
    decode_s = time.perf_counter() - start
    peak = status("VmHWM") - base
    budget = args.budget_mb * 1e6
    limit = weights + accounted + budget
    print(f"\n{args.tokens}-token prompt, width {cfg.dim}, {cfg.n_layers} layers (1 NoPE), {args.dtype} "
          f"(KV cache {str(kv).removeprefix('torch.')}), {torch.get_num_threads()} threads")
    print(f"prefill: {prefill_s:.1f} s ({args.tokens / prefill_s:.0f} tokens/s); decode after it: "
          f"{args.decode / decode_s:.1f} tokens/s")
    print(f"weights {weights / 1e6:.0f} MB, KV cache {accounted / 1e6:.0f} MB (a cache of every layer: "
          f"{full_cache_bytes(cfg, max_len, 1, kv) / 1e6:.0f} MB), activation budget {budget / 1e6:.0f} MB")
    print(f"peak resident growth {peak / 1e6:.0f} MB = {peak / limit:.2f}x of weights + cache + budget "
          f"(target <= 1.5x)")
    return 0 if peak <= 1.5 * limit else 1


if __name__ == "__main__":
    sys.exit(main())
