"""Training speed and memory: herd's training step vs a plain transformers loop, same MoE model,
same weights, same data, same optimizer settings, same threads.

Each side runs in its own process (so peak memory is its own): build the model, copy the same
random weights in (herd's converter to HF names), then forward + backward + AdamW step on the same
token rows. Printed: tokens/s, ratio, peak resident memory, and the first step's loss on both
sides (they must agree: same numbers, not just similar speed).

    python benchmarks/training.py                  # width 256, 4 layers, 16 experts top-1
    python benchmarks/training.py --steps 10 --experts 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herd.config import MoEConfig, TextConfig, rope_layout, every  # noqa: E402


def model_config(args) -> TextConfig:
    return TextConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=2,
                      head_dim=args.dim // 8, ffn_dim=4 * args.dim, uses_rope=rope_layout(args.layers, 4),
                      is_moe=every(args.layers, 1), moe=MoEConfig(args.experts, 1, 2 * args.dim),
                      attention_chunk_size=64, max_seq_len=4096)


def token_rows(args) -> torch.Tensor:
    """[steps + warmup, batch, seq + 1] ids: the test corpus, tokenised, ids renumbered into the small vocab."""
    from herd.tokenizer.tokenizer import Tokenizer
    from tests.corpus import corpus
    tok = Tokenizer.bundled()
    ids = torch.tensor(tok.encode(corpus(3000, seed=5)))
    uniq, dense = torch.unique(ids, return_inverse=True)
    assert len(uniq) <= args.vocab, f"corpus has {len(uniq)} distinct ids > vocab {args.vocab}"
    n = (args.steps + args.warmup) * args.batch
    need = n * (args.seq + 1)
    dense = dense.repeat(-(-need // len(dense)))[:need]
    return dense.view(args.steps + args.warmup, args.batch, args.seq + 1)


def run_side(args) -> dict:
    torch.set_num_threads(args.threads)
    from herd.checkpoint import hf
    from herd.model.init import init_weights
    from herd.model.transformer import TextModel
    from herd.train.loss import summed_loss
    cfg = model_config(args)
    herd_model = init_weights(TextModel(cfg), seed=0, std=0.02)
    rows = token_rows(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.side == "herd":
        model = herd_model.train()

        def loss_of(batch):
            return summed_loss(model, batch[:, :-1], batch[:, 1:]) / batch[:, 1:].numel()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        from transformers import Llama4ForCausalLM, Llama4TextConfig
        from herd.config import to_hf_text_config
        hc = Llama4TextConfig(**to_hf_text_config(cfg))
        hc._attn_implementation = "sdpa"
        hc.pad_token_id = None  # its default (200018) lies outside a small vocabulary; herd has no padding row
        hc.use_cache = False
        model = Llama4ForCausalLM(hc)
        model.load_state_dict(hf.to_hf(herd_model.state_dict(), cfg, layout="causal"))
        model.train()
        del herd_model

        def loss_of(batch):  # the usual loop: full logits, then cross-entropy on the next tokens
            logits = model(input_ids=batch[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = loss_of(rows[i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"  {args.side}: step {i + 1}/{args.warmup + args.steps} {times[-1]:.2f} s", file=sys.stderr)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed = times[args.warmup:]
    tokens = args.batch * args.seq
    return {"tokens_per_s": tokens * len(timed) / sum(timed), "first_loss": losses[0], "losses": losses,
            "peak_rss_mb": peak / 1024, "peak_growth_mb": (peak - base) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--side", choices=["herd", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    results = {}
    for side in ("herd", "transformers"):
        cmd = [sys.executable, __file__, "--side", side] + [f"--{k}={v}" for k, v in vars(args).items()
                                                             if k != "side"]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = model_config(args)
    h, t = results["herd"], results["transformers"]
    print(f"\nTraining step, {args.dim} wide, {args.layers} layers, {args.experts} experts top-1 (+ shared), "
          f"vocab {args.vocab}, {args.batch} x {args.seq} tokens, float32, {args.threads} threads, "
          f"{cfg.param_count() / 1e6:.1f}M params ({cfg.param_count(active=True) / 1e6:.1f}M active)")
    print(f"| | herd | transformers | herd / transformers |\n|---|---|---|---|")
    print(f"| tokens/s | {h['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {h['tokens_per_s'] / t['tokens_per_s']:.2f}x |")
    print(f"| peak RSS (MB) | {h['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f} | {h['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    print(f"| first-step loss | {h['first_loss']:.6f} | {t['first_loss']:.6f} | |")


if __name__ == "__main__":
    main()
