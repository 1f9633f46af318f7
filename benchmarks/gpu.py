"""herd on a CUDA GPU: correctness checks, then prefill/decode speed against transformers, one run.

    python benchmarks/gpu.py [--layers 8] [--experts 16] [--json out.json]

Checks (float32 unless said): tiny presets' logits on the GPU against the CPU; cached greedy
generation against full forwards on the GPU, crossing several attention chunks; a batch of
prompts of different lengths against one by one; in bf16 the grouped-GEMM MoE path against the
every-expert reference. Exits non-zero when a check fails.

Speed: the generation benchmark's model (width 1024, 8 layers, 16 experts top-1, 202,048
vocabulary), random weights made on the GPU, bf16, herd against transformers' Llama4ForCausalLM
on the same weights: prefill tokens/s at 512 and 4096 tokens, decode tokens/s at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import herd  # noqa: E402
from herd.checkpoint.load import save_hf  # noqa: E402
from herd.engine.generate import full_forward_tokens  # noqa: E402
from herd import kernels  # noqa: E402
from herd.model.init import init_weights  # noqa: E402
from herd.model.transformer import TextModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import bench_config, herd_decode, herd_prefill, hf_decode, hf_prefill  # noqa: E402

PROMPT = "The llama is a domesticated South American camelid. " * 3


def checks() -> list[tuple[str, bool, str]]:
    out = []
    for name in ("tiny-moe", "tiny-interleaved", "tiny-dense"):
        cpu = herd.load(name, seed=3)
        gpu = herd.load(name, seed=3, device="cuda")
        ids = cpu.tokenizer.encode(PROMPT, bos=True)
        a, b = cpu.logits([ids]), gpu.logits([ids]).cpu()
        gap = float((a - b).abs().max() / a.abs().max())
        out.append((f"{name}: float32 logits GPU vs CPU", gap < 1e-4, f"{gap:.2e}"))
        new = gpu.generate(ids, max_new_tokens=30).token_ids
        ref = full_forward_tokens(gpu.model, ids, 30, gpu.tokenizer.stop_ids)
        out.append((f"{name}: cached greedy == full forwards on GPU (crosses >= 3 chunks)", new == ref,
                    f"{sum(x == y for x, y in zip(new, ref))}/{len(ref)} equal"))
        prompts = [PROMPT, "Hello", "A much longer prompt about llamas and alpacas " * 4]
        batch = [g.token_ids for g in gpu.generate(prompts, max_new_tokens=12)]
        alone = [gpu.generate(p, max_new_tokens=12).token_ids for p in prompts]
        out.append((f"{name}: batch of 3 lengths == one by one", batch == alone, ""))
    llm = herd.load("tiny-moe", seed=3, device="cuda", dtype="bfloat16")
    ids = torch.tensor([llm.tokenizer.encode(PROMPT, bos=True)], device="cuda")
    fast = llm.model(ids)
    for layer in llm.model.layers:
        if hasattr(layer.feed_forward, "dense_reference"):
            layer.feed_forward.dense_reference = True
    ref = llm.model(ids)
    gap = float((fast - ref).abs().max() / ref.abs().max())
    out.append(("bf16 grouped-GEMM MoE vs every-expert reference", gap < 2e-2, f"{gap:.2e}"))
    return out


def speeds(prefill, decode, prompts: list[int], batches: list[int], steps: int) -> dict:
    """Best of 3 (the first run of a shape pays for kernel selection and caches)."""
    res = {f"prefill {n}": prefill(n, repeat=3) for n in prompts}
    res |= {f"decode batch {b}": decode(b, steps, repeat=3) for b in batches}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = checks()
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    cfg = bench_config(args.layers, args.experts)
    model = kernels.apply(init_weights(TextModel(cfg)).to(device="cuda", dtype=torch.bfloat16).eval())
    prompts, batches = [512, 4096], [1, 8]
    ours = speeds(partial(herd_prefill, model), partial(herd_decode, model), prompts, batches, args.steps)
    theirs = {}
    try:
        from transformers import Llama4ForCausalLM

        folder = Path(tempfile.mkdtemp()) / "ckpt"
        save_hf(model, folder)
        hf = Llama4ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        theirs = speeds(partial(hf_prefill, hf), partial(hf_decode, hf), prompts, batches, args.steps)
    except Exception as e:  # report, do not hide herd's figures
        print(f"transformers could not run: {type(e).__name__}: {e}", flush=True)
    print(f"\n{cfg.n_layers} layers, width {cfg.dim}, {args.experts} experts top-1, vocab {cfg.vocab_size}, bf16, "
          f"tokens/s")
    print(f"{'case':16} {'herd':>10} {'transformers':>13} {'ratio':>7}")
    for case, v in ours.items():
        t = theirs.get(case)
        print(f"{case:16} {v:10.1f} {t or float('nan'):13.1f} {v / t if t else float('nan'):6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"checks": results, "herd": ours, "transformers": theirs}, indent=1))
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
