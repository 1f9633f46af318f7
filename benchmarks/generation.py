"""Prefill and decode speed of herd against transformers on the same weights, in one run.

    python benchmarks/generation.py [--dtypes bfloat16 float32] [--threads 2] [--layers 8] [--experts 16]
                                    [--prompts 512 4096] [--batches 1 8] [--steps 32] [--llamacpp]
                                    [--json out.json] [--plot out.png]

The model: a random Llama 4 of width 1024 (8 heads of 128, 2 KV heads), ``--layers`` layers, every
layer MoE with ``--experts`` experts of width 1024 (top-1) + shared expert, the real 202,048-token
vocabulary, chunk 8192 and a NoPE layer every 4th. It is written once as a Hugging Face checkpoint
(bf16) and loaded by both libraries in each dtype, with the same thread count.

  prefill: tokens/s for one prompt of N tokens (herd: chunked prefill into its KV cache;
           transformers: one forward with its cache, logits for the last position only);
  decode:  tokens/s over ``--steps`` greedy steps after a 64-token prompt, for B sequences at once
           (B x steps / time), both with their KV caches; in bf16 at batch 1 also with
           herd.load(..., compile=True) ("decode b1 compile": the output product compiled);
  b1 products only: steps/s of nothing but a batch-1 step's weight products by herd's kernels (see
           `products_alone`): the ceiling of herd's batch-1 decode on this machine with those kernels.

Then, without transformers: KV-cache bytes of the Scout config at 8K / 128K / 1M tokens against a
cache that keeps every layer's entries; decode step time of 2-layer models with 16 vs 128 experts
at equal active parameters (vocabulary 256, so the head does not hide the layers); and a
"Scout-shaped" 2-layer slice (real widths, 16 experts of 8192) for per-layer prefill/decode cost.

``--llamacpp`` also runs ../shared/anchors/llamacpp/bench.sh on the same folder (pp512 / tg128 in
bf16), which needs llama.cpp built by its build.sh and `pip install gguf sentencepiece protobuf`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP = ROOT.parent / "shared" / "anchors" / "llamacpp"  # llama.cpp's build and bench scripts
sys.path.insert(0, str(ROOT))

import herd  # noqa: E402
from herd.checkpoint.load import save_hf  # noqa: E402
from herd.config import MoEConfig, TextConfig, every, rope_layout  # noqa: E402
from herd.engine.generate import Engine  # noqa: E402
from herd import kernels  # noqa: E402
from herd.model.init import init_weights  # noqa: E402
from herd.model.transformer import TextModel  # noqa: E402


def bench_config(layers: int, experts: int) -> TextConfig:
    return TextConfig(vocab_size=202_048, dim=1024, n_layers=layers, n_heads=8, n_kv_heads=2, head_dim=128,
                      ffn_dim=4096, uses_rope=rope_layout(layers, 4), is_moe=every(layers, 1),
                      moe=MoEConfig(experts, 1, 1024), attention_chunk_size=8192, max_seq_len=131_072)


def scout_slice_config(vocab_size: int = 256) -> TextConfig:
    """Two layers of Scout's widths (a RoPE and a NoPE layer, both MoE: 16 experts of 8192 and the
    shared one); a small vocabulary so the head does not hide the layers."""
    from herd.config import PRESETS

    return TextConfig(**{**PRESETS["scout"].text.__dict__, "n_layers": 2, "uses_rope": (True, False),
                         "is_moe": (True, True), "vocab_size": vocab_size})


def write_checkpoint(cfg: TextConfig, folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    print(f"writing a random {cfg.param_count() / 1e9:.2f}B-parameter checkpoint to {folder} ...", file=sys.stderr)
    model = init_weights(TextModel(cfg)).to(torch.bfloat16)
    save_hf(model, folder)
    return folder


def bench_parser(doc: str, **counts: int) -> argparse.ArgumentParser:
    """The options of the scripts that time the benchmark model's checkpoint: --dir, --rounds,
    --threads, and one integer option per keyword (name=default)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("HERD_BENCH_DIR"), help="checkpoint folder (kept between runs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    for name, default in counts.items():
        ap.add_argument(f"--{name}", type=int, default=default)
    return ap


def bench_folder(args: argparse.Namespace) -> Path:
    """The benchmark model's checkpoint (written once, with Llama 4's tokenizer), torch on --threads."""
    torch.set_num_threads(args.threads)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="herd-bench-"))
    if not (folder / "config.json").exists():
        write_checkpoint(bench_config(8, 16), folder)
    add_llama4_tokenizer(folder)
    return folder


def add_llama4_tokenizer(folder: Path) -> None:
    """llama.cpp's converter needs the checkpoint's tokenizer.json: the real Llama 4 one, built from
    the llama-models package's tiktoken file by ../shared/anchors/llamacpp/make_tokenizer.py."""
    if (folder / "tokenizer.json").exists():
        return
    import llama_models

    site = Path(llama_models.__file__).resolve().parents[1]
    script = LLAMACPP / "make_tokenizer.py"
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(script), str(site), tmp], check=True, capture_output=True)
        (folder / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())


def timed(fn, repeat: int = 1) -> float:
    """Seconds of the fastest of ``repeat`` calls (on a GPU, synchronised: the work, not its launch)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best = float("inf")
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def engine(model: TextModel, rows: int, max_len: int) -> Engine:
    """An Engine with the KV cache herd.load picks (herd.kernels.cache_dtype)."""
    w = model.tok_embeddings.weight
    return Engine(model, rows=rows, max_len=max_len, kv_dtype=kernels.cache_dtype(w.dtype, w.device))


def _random_ids(shape: tuple[int, ...], device: torch.device, vocab: int = 200_000) -> torch.Tensor:
    return torch.randint(0, min(vocab, 200_000), shape, device=device)


@torch.inference_mode()
def herd_prefill(model: TextModel, n: int, repeat: int = 1) -> float:
    """Tokens/s of a prefill of n tokens into herd's KV cache (default segment size)."""
    ids = _random_ids((n,), model.tok_embeddings.weight.device, model.tok_embeddings.num_embeddings).tolist()
    eng = engine(model, rows=1, max_len=n + 1)
    eng.prefill(0, ids[:64])  # warm-up
    return n / timed(lambda: eng.prefill(0, ids), repeat)


@torch.inference_mode()
def herd_decode(model: TextModel, batch: int, steps: int, repeat: int = 1) -> float:
    """Tokens/s of greedy decode steps for ``batch`` rows after 64-token prompts."""
    device = model.tok_embeddings.weight.device
    eng = engine(model, rows=batch, max_len=64 + (repeat + 1) * steps + 2)
    for r in range(batch):
        eng.prefill(r, _random_ids((64,), device, model.tok_embeddings.num_embeddings).tolist())
    tokens = [1] * batch
    eng.decode(tokens)  # warm-up

    def run():
        nonlocal tokens
        for _ in range(steps):
            tokens = eng.decode(tokens).argmax(-1).tolist()

    return batch * steps / timed(run, repeat)


@torch.inference_mode()
def products_alone(model: TextModel, steps: int, repeat: int = 1) -> float:
    """Steps/s of nothing but the weight products of batch-1 decode steps: each layer's projections,
    router, one routed expert (another one each step, as real tokens pick) and shared expert, then the
    output head, through herd's `linear` (the same kernels on the same weights). What herd's decode would
    reach if attention, norms, routing, the cache and Python cost nothing."""
    from herd.kernels.cpu import linear
    from herd.model.moe import MoE

    def weights(step: int) -> list[torch.Tensor]:
        ws = []
        for i, block in enumerate(model.layers):
            a, f = block.attention, block.feed_forward
            ws += [a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight]
            if isinstance(f, MoE):
                e = (step + i) % f.experts.w1.shape[0]
                ws += [f.router.weight, f.experts.w1[e], f.experts.w3[e], f.experts.w2[e]]
                f = f.shared_expert
            ws += [f.w1.weight, f.w3.weight, f.w2.weight]
        return ws + [model.output.weight]

    w0 = model.output.weight
    plan = [weights(s) for s in range(steps)]
    inputs = {n: torch.randn(1, n, dtype=w0.dtype, device=w0.device) for n in {w.shape[1] for w in plan[0]}}
    linear(inputs[w0.shape[1]], w0)  # warm-up

    def run():
        for ws in plan:
            for w in ws:
                linear(inputs[w.shape[1]], w)

    return steps / timed(run, repeat)


@torch.inference_mode()
def hf_prefill(model, n: int, repeat: int = 1) -> float:
    ids = _random_ids((1, n), model.device)
    model(ids[:, :4], use_cache=True, logits_to_keep=1)  # warm-up
    return n / timed(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat)


@torch.inference_mode()
def hf_decode(model, batch: int, steps: int, prompt: int = 64, repeat: int = 1) -> float:
    out = model(_random_ids((batch, prompt), model.device), use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(nxt, past_key_values=cache, use_cache=True)  # warm-up step
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

    def run():
        nonlocal cache, nxt
        for _ in range(steps):
            o = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    return batch * steps / timed(run, repeat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--prompts", nargs="+", type=int, default=[512, 4096])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--tf-bf16-tokens", type=int, default=16,
                    help="transformers in bf16: prompt tokens and decode steps to time (it is very slow)")
    ap.add_argument("--llamacpp", action="store_true")
    ap.add_argument("--scout-slice", action="store_true", help="also time 2 Scout-width layers (~9 GB in bf16)")
    ap.add_argument("--dir", default=os.environ.get("HERD_BENCH_DIR"), help="checkpoint folder (kept between runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="also draw the table as a bar chart (PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench_config(args.layers, args.experts)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp()) / "ckpt"
    write_checkpoint(cfg, folder)
    rows = []
    for dtype in args.dtypes:
        llm = herd.load(folder, dtype=dtype, progress=False)
        hf = None
        if not args.no_transformers:
            from transformers import Llama4ForCausalLM

            hf = Llama4ForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        # transformers in bf16 runs ~0.6 tokens/s on CPUs without bf16 matrix instructions (its
        # experts' bf16 bmm): it is timed on --tf-bf16-tokens tokens instead (its rate barely
        # depends on the length there), and the table marks those figures with *.
        cap = args.tf_bf16_tokens if dtype == "bfloat16" else None
        cases = [(f"prefill {n}", lambda n=n: herd_prefill(llm.model, n), lambda n=n: hf_prefill(hf, min(n, cap or n)))
                 for n in args.prompts]
        cases += [(f"decode batch {b}", lambda b=b: herd_decode(llm.model, b, args.steps),
                   lambda b=b: hf_decode(hf, b, min(args.steps, cap or args.steps), cap or 64)) for b in args.batches]
        for name, ours, theirs in cases:
            print(f"{dtype} {name} ...", file=sys.stderr)
            row = {"dtype": dtype, "case": name, "herd": ours()}
            if hf is not None:
                row["transformers"] = theirs()
                row["transformers_capped"] = cap is not None
            rows.append(row)
        if 1 in args.batches:  # the ceiling of herd's batch-1 decode with its kernels
            rows.append({"dtype": dtype, "case": "b1 products only", "herd": products_alone(llm.model, args.steps)})
        del llm, hf
    if "bfloat16" in args.dtypes and 1 in args.batches:  # herd.load(..., compile=True): the compiled output product
        llm = herd.load(folder, dtype="bfloat16", progress=False, compile=True)
        rows.append({"dtype": "bfloat16", "case": "decode b1 compile", "herd": herd_decode(llm.model, 1, args.steps)})
        del llm
    if args.llamacpp:
        add_llama4_tokenizer(folder)
        script = LLAMACPP / "bench.sh"
        # bench.sh's `python3` converts the checkpoint (torch, transformers, gguf): make it this interpreter
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        out = subprocess.run(["bash", str(script), str(folder), "bf16", str(args.threads)], capture_output=True,
                             text=True, env=env)
        for line in out.stdout.splitlines():  # "llama.cpp pp512: 2020.0 tokens/s"
            kind, rate = line.split()[1].rstrip(":"), float(line.split()[2])
            cases = ("prefill 512",) if kind == "pp512" else ("decode batch 1", "decode b1 compile", "b1 products only")
            for row in rows:
                if row["dtype"] == "bfloat16" and row["case"] in cases:
                    row["llama.cpp"] = rate
        if out.returncode or not out.stdout.strip():
            print(f"llama.cpp's bench.sh failed (exit {out.returncode}), no llama.cpp figures: {out.stderr[-2000:]}"
                  f"(its conversion log: ~/.cache/herd-anchors/gguf/*.log)", file=sys.stderr)
        if "bfloat16" in args.dtypes and 1 in args.batches:  # this machine drifts: time herd again, right after
            for compile_, case in ((False, "decode batch 1"), (True, "decode b1 compile")):
                llm = herd.load(folder, dtype="bfloat16", progress=False, compile=compile_)
                for row in rows:
                    if row["dtype"] == "bfloat16" and row["case"] == case:
                        row["herd_again"] = herd_decode(llm.model, 1, args.steps)
                del llm
    print(f"\n{cfg.n_layers} layers, width {cfg.dim}, {args.experts} experts top-1, vocab {cfg.vocab_size}, "
          f"{args.threads} threads; tokens/s")
    print(f"{'dtype':9} {'case':16} {'herd':>9} {'transformers':>13} {'llama.cpp':>10} {'vs tf':>7} {'vs l.cpp':>9}")
    for r in rows:
        tf, lc = r.get("transformers"), r.get("llama.cpp")
        mark = "*" if r.get("transformers_capped") else " "
        print(f"{r['dtype']:9} {r['case']:16} {r['herd']:9.1f} {tf or float('nan'):12.1f}{mark} {lc or float('nan'):10.1f} "
              f"{r['herd'] / tf if tf else float('nan'):6.2f}x {r['herd'] / lc if lc else float('nan'):8.2f}x")
    for r in rows:
        if "herd_again" in r and r.get("llama.cpp"):
            print(f"bf16 {r['case']} timed again right after llama.cpp: {r['herd_again']:.1f} tokens/s "
                  f"({r['herd_again'] / r['llama.cpp']:.2f}x llama.cpp)")
    if any(r.get("transformers_capped") for r in rows):
        print(f"* transformers timed on {args.tf_bf16_tokens} prompt tokens / decode steps (bf16 is too slow for more)")
    if args.plot:
        plot(rows, Path(args.plot), f"{cfg.n_layers} layers, width {cfg.dim}, {args.experts} experts top-1, "
             f"vocab {cfg.vocab_size}, {args.threads} threads")
    extra = extras(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **extra}, indent=1))
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    """The table as horizontal bars, one group per case: herd, transformers and llama.cpp tokens/s on a
    log scale, each bar labelled with its rate and herd's ratio to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("herd", "tab:green"), ("transformers", "tab:gray"), ("llama.cpp", "tab:blue")]
    fig, ax = plt.subplots(figsize=(9, 0.62 * len(rows) + 1.2))
    labelled = set()
    for i, r in enumerate(rows):
        for j, (side, colour) in enumerate(sides):
            rate = r.get(side)
            if not rate:
                continue
            y = i + (j - 1) * 0.27
            ax.barh(y, rate, height=0.25, color=colour, label=None if side in labelled else side)
            labelled.add(side)
            note = f"{rate:.1f}" if side == "herd" else f"{rate:.1f} (herd {r['herd'] / rate:.2f}x)"
            ax.text(rate * 1.03, y, note, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['dtype'].replace('bfloat16', 'bf16').replace('float32', 'f32')} {r['case']}"
                                      for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=ax.get_xlim()[1] * 4)  # room for the labels
    ax.set_xlabel("tokens/s (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"chart: {path}")


@torch.inference_mode()
def decode_step_s(model: TextModel, steps: int = 32) -> float:
    eng = engine(model, rows=1, max_len=64 + steps + 2)
    eng.prefill(0, list(range(64)))
    eng.decode([1])
    return timed(lambda: [eng.decode([1]) for _ in range(steps)]) / steps


def extras(args) -> dict:
    from herd.config import PRESETS
    from herd.engine.cache import full_cache_bytes, kv_cache_bytes

    out: dict = {"kv": [], "experts": {}}
    scout = PRESETS["scout"].text
    print("\nKV cache, Scout config, bf16, batch 1:")
    print(f"{'context':>9} {'herd GB':>9} {'all-layer GB':>13} {'ratio':>6} {'herd bytes/token':>17}")
    for n in (8192, 131072, 1 << 20):
        ours, full = kv_cache_bytes(scout, n), full_cache_bytes(scout, n)
        out["kv"].append({"context": n, "herd": ours, "full": full})
        print(f"{n:9d} {ours / 1e9:9.2f} {full / 1e9:13.2f} {ours / full:6.3f} {ours / n:17.0f}")
    print(f"\ndecode step, 2 layers of width 1024, vocabulary 256, bf16, {args.threads} threads "
          f"(median of 5, the two models alternating):")
    models = {}
    for experts in (16, 128):
        cfg = bench_config(2, experts)
        cfg = TextConfig(**{**cfg.__dict__, "vocab_size": 256})
        models[experts] = kernels.apply(init_weights(TextModel(cfg)).to(torch.bfloat16).eval())
    times: dict[int, list[float]] = {16: [], 128: []}
    for _ in range(5):  # alternating, so a slow spell of this shared machine hits both
        for experts, model in models.items():
            times[experts].append(decode_step_s(model, 64))
    for experts in models:
        out["experts"][experts] = sorted(times[experts])[2]
        print(f"  {experts:3d} experts: {out['experts'][experts] * 1e3:6.2f} ms/step")
    del models
    ratio = out["experts"][128] / out["experts"][16]
    print(f"  128 / 16 experts: {ratio:.2f}x")
    if args.scout_slice:
        scout2 = scout_slice_config()
        print("\nScout-shaped slice (2 layers: width 5120, 40/8 heads, 16 experts of 8192 + shared), bf16 ...",
              file=sys.stderr)
        model = TextModel(scout2).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        kernels.apply(model.eval())
        step = decode_step_s(model, steps=8)
        ids = [i % scout2.vocab_size for i in range(512)]
        eng = engine(model, rows=1, max_len=600)
        eng.prefill(0, ids[:32])
        prefill = 512 / timed(lambda: eng.prefill(0, ids))
        out["scout_slice"] = {"decode_step_s": step, "prefill_tok_s": prefill}
        print(f"Scout-shaped slice, 2 layers, bf16: decode {step * 1e3:.1f} ms/step ({step / 2 * 1e3:.1f} ms per "
              f"layer), prefill 512 tokens {prefill:.1f} tokens/s")
    return out


if __name__ == "__main__":
    sys.exit(main())
