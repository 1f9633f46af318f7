"""What tensor parallelism costs per step, what it moves, and what it saves in memory per rank.

    python benchmarks/distributed.py [--sizes 2] [--dtypes float32 bfloat16] [--layers 4] [--experts 16]
                                     [--prefill 256] [--steps 32] [--rounds 4] [--threads 2]
                                     [--device cpu|cuda] [--quick] [--memory-only]

Timing: T processes (torch.multiprocessing, one machine) join one group through `steps.init`, as
under torchrun: gloo on the CPU, NCCL with ``--device cuda`` (one GPU a rank). Each takes its shard
of the generation benchmark's model (benchmarks/generation.py: width 1024, 8 heads, 2 KV heads,
``--experts`` experts of width 1024 top-1 + shared expert, the real 202,048-token vocabulary;
random weights). Rank 0 also holds the whole model. In interleaved rounds it times one process
(T = 1) with ``--threads`` threads, one process with ``--threads / T`` threads, and the T ranks with
``--threads / T`` threads each (the other ranks wait in their next collective meanwhile, without
spinning). The fastest of the rounds is reported, with the machine's load average before the run
(a busy machine hurts T = 1's threads, and ranks that must meet at every collective, the most):
  prefill  one step of ``--prefill`` tokens (one segment) into an empty cache row, fastest of 3;
  decode   one batch-1 step after a 64-token prompt, median of ``--steps`` steps.
"ratio" is the T ranks' time over one process's on the same cores. "work" is T x the ranks' time
over one process's on one rank's threads: 1.00 means splitting costs nothing, 1.20 that a sixth of
the work is overhead (collectives, the plan, smaller products, what each rank repeats). "comms" is
the time of the step's collectives alone, issued back to back by every rank before the models are
built. Then the collectives rank 0 issued in each step, by kind, with the bytes of the tensors it handed
them (`tensor.COUNTS`, `tensor.BYTES`: a gather counts this rank's part of the logits).

Memory (no timing, no weights: models built on the meta device): the text decoder's bytes per rank
for Scout and Maverick at T = 1, 2, 4, 8, split into replicated (embedding, norms, routers) and
sharded parts, in bf16, FP8 and int4; plus the KV cache per rank at 128K tokens (bf16). The rank's
model is `herd.llm.plan`'s, sliced by `tensor.shard` with a TensorParallel(0, T) (slicing issues no
collective), then quantized by `quant.install` as herd quantizes on load:
  bf16  every weight 2 bytes;
  FP8   the layout of Meta's FP8 release as herd holds it on a GPU with FP8 tensor cores
        (`quantize='fp8'`, modules 'experts'): routed experts 1 byte per weight and a float32 scale
        per (expert, output row), the rest bf16 (on a CPU herd dequantizes FP8: the bf16 column);
  int4  herd's default int4 (`--quantize int4`): routed and shared experts in groups of 128.
The int4 bytes are what a rank holds under `--tp T --quantize int4`: built, sharded and quantized on
the meta device as the loader does it.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import bench_config  # noqa: E402
from herd import kernels  # noqa: E402
from herd.config import PRESETS, ModelConfig  # noqa: E402
from herd.distributed import steps  # noqa: E402
from herd.distributed.tensor import BYTES, COUNTS, TensorParallel, all_reduce, gather_columns, shard  # noqa: E402
from herd.engine.cache import kv_cache_bytes  # noqa: E402
from herd.engine.generate import Engine  # noqa: E402
from herd.kernels import quant  # noqa: E402

PROMPT = 64  # tokens before the timed decode steps
MEMORY_SIZES = (1, 2, 4, 8)
FORMATS = {"bf16": None, "FP8": quant.QuantSpec("fp8", modules=("experts",)), "int4": quant.QuantSpec("int4", 128)}
KV_CONTEXT = 131_072


# ---- memory per rank, on the meta device ----------------------------------------------------------


def rank_state(cfg: ModelConfig, size: int, spec: quant.QuantSpec | None) -> dict[str, int]:
    """Tensor name -> bytes of rank 0's text decoder at tensor-parallel size ``size`` (meta device)."""
    from herd.llm import plan

    model, _ = plan(cfg, torch.bfloat16, vision=False)
    shard(model, TensorParallel(0, size))
    if spec is not None:
        quant.install(model, spec, torch.bfloat16)
    return {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}


def rank_memory(cfg: ModelConfig, spec: quant.QuantSpec | None, sizes=MEMORY_SIZES) -> dict[int, tuple[int, int]]:
    """T -> (replicated, sharded) bytes of one rank's text weights. A tensor is sharded when it is
    smaller at T = 2 than at T = 1."""
    one, two = rank_state(cfg, 1, spec), rank_state(cfg, 2, spec)
    sharded = {name for name in one if two[name] != one[name]}
    out = {}
    for T in sizes:
        state = one if T == 1 else rank_state(cfg, T, spec)
        split = sum(b for name, b in state.items() if name in sharded)
        out[T] = (sum(state.values()) - split, split)
    return out


def memory_table(names=("scout", "maverick")) -> list[dict]:
    rows = []
    for name in names:
        cfg = PRESETS[name]
        kv = kv_cache_bytes(cfg.text, KV_CONTEXT, 1, torch.bfloat16)
        for fmt, spec in FORMATS.items():
            print(f"memory: {name} {fmt} ...", file=sys.stderr)
            for T, (rep, split) in rank_memory(cfg, spec).items():
                rows.append(dict(model=name, format=fmt, T=T, replicated=rep, sharded=split, kv=kv // T))
    return rows


def print_memory(rows: list[dict]) -> None:
    gib = 2 ** 30
    print(f"\nText-decoder weights per rank, GiB (meta device; KV cache: bf16, {KV_CONTEXT // 1024}K tokens, one "
          "sequence)")
    print(f"{'model':10} {'format':6} {'T':>2} {'replicated':>10} {'sharded':>8} {'per rank':>9} {'x T=1':>6} "
          f"{'KV/rank':>8}")
    whole = {}
    for r in rows:
        total = r["replicated"] + r["sharded"]
        whole.setdefault((r["model"], r["format"]), total)
        print(f"{r['model']:10} {r['format']:6} {r['T']:2d} {r['replicated'] / gib:10.2f} {r['sharded'] / gib:8.2f} "
              f"{total / gib:9.2f} {total / whole[(r['model'], r['format'])]:6.3f} {r['kv'] / gib:8.2f}")


# ---- per-step cost -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(cfg, dtype: torch.dtype, device: torch.device):
    """The benchmark model with random weights, made in ``dtype`` on ``device`` (no float32 copy)."""
    from herd.model.init import init_weights
    from herd.model.transformer import TextModel

    with torch.device("meta"):
        model = TextModel(cfg)
    return init_weights(model.to(dtype).to_empty(device=device)).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(make_engine, device, prefill: int, steps: int, repeat: int = 3) -> dict:
    """Seconds of one prefill step of ``prefill`` tokens (fastest of ``repeat``) and of one decode step
    (median of ``steps``: a busy machine's bursts hit single steps), with rank 0's collectives (counts,
    bytes) of one of each."""
    ids = torch.randint(0, 200_000, (max(prefill, PROMPT),)).tolist()

    def clocked(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        eng = make_engine(rows=1, max_len=max(prefill, PROMPT + steps + 2))
        eng.prefill(0, ids[:PROMPT])  # warm-up
        counts, nbytes = COUNTS.copy(), BYTES.copy()
        times = [clocked(lambda: eng.prefill(0, ids[:prefill]))]
        out = {"prefill_counts": dict(COUNTS - counts), "prefill_bytes": dict(BYTES - nbytes)}
        times += [clocked(lambda: eng.prefill(0, ids[:prefill])) for _ in range(repeat - 1)]
        out["prefill"] = min(times)
        eng.cache.lengths[0] = 0
        eng.prefill(0, ids[:PROMPT])
        token = [1]
        eng.decode(token)  # warm-up
        counts, nbytes = COUNTS.copy(), BYTES.copy()
        token = [int(eng.decode(token)[0].argmax())]
        out["decode_counts"], out["decode_bytes"] = dict(COUNTS - counts), dict(BYTES - nbytes)

        def step():
            token[0] = int(eng.decode(token)[0].argmax())  # rank 0 needs the token: a sync per step, as serving

        out["decode"] = statistics.median(clocked(step) for _ in range(steps))
    return out


def _collectives_alone(tp: TensorParallel, cfg, dtype: torch.dtype, device, tokens: int, n: int) -> float:
    """Seconds (median of ``n``) of nothing but one step's collectives, on every rank: the plan's
    broadcast, 2 all-reduces per layer of ``tokens`` hidden states, the gather of one token's logits."""
    plan = torch.zeros(steps.HEADER + 3 * tp.step_tokens, dtype=torch.long)
    h = torch.zeros(1, tokens, cfg.dim, dtype=dtype, device=device)
    logits = torch.zeros(1, -(-cfg.vocab_size // tp.size), device=device)
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        steps._broadcast(plan, tp)
        for _ in range(2 * cfg.n_layers):
            all_reduce(h, tp)
        gather_columns(logits, tp, cfg.vocab_size)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, size: int, args: argparse.Namespace, port: int, result: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    share = max(1, args.threads // size)
    torch.set_num_threads(share)
    tp = steps.init(size, args.device, step_tokens=max(args.prefill, PROMPT))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu")
    cfg = bench_config(args.layers, args.experts)
    out = {}
    try:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            alone = {kind: _collectives_alone(tp, cfg, dtype, device, tokens, args.steps)
                     for kind, tokens in (("prefill", args.prefill), ("decode", 1))}
            model = kernels.apply(shard(_build(cfg, dtype, device), tp))
            if not tp.leader:
                steps.follow(model, tp)
                continue
            whole = kernels.apply(_build(cfg, dtype, device))
            kv = kernels.cache_dtype(dtype, device)
            chunk = max(args.prefill, PROMPT)
            one = functools.partial(Engine, whole, prefill_chunk=chunk, kv_dtype=kv)
            many = functools.partial(steps.LeaderEngine, tp, model, prefill_chunk=chunk, kv_dtype=kv)
            # (label, engine, threads): one process on all threads, on one rank's threads, then T ranks.
            cases = [("one", one, args.threads), ("one_thin", one, share), ("tp", many, share)]
            runs = {label: [] for label, _, _ in cases}
            for r in range(args.rounds):
                for label, make, threads in cases if r % 2 == 0 else cases[::-1]:
                    print(f"{name} round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr)
                    torch.set_num_threads(threads)
                    runs[label].append(_time_steps(make, device, args.prefill, args.steps))
            steps.stop(tp)
            out[name] = {**runs, "collectives": alone}
            del whole
        if tp.leader:
            torch.save(out, result)
    finally:
        dist.destroy_process_group()


def step_costs(args: argparse.Namespace, size: int) -> dict:
    """Spawn ``size`` ranks; returns rank 0's timings: dtype -> T -> [one dict per round]."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.start_processes(_worker, args=(size, args, _free_port(), result), nprocs=size, start_method="spawn")
        return torch.load(result)


def _kinds(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def _sizes(d: dict) -> str:
    return ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in sorted(d.items())) or "none"


def print_costs(args: argparse.Namespace, size: int, costs: dict, load: float) -> None:
    backend = "NCCL" if args.device == "cuda" else "gloo"
    cfg = bench_config(args.layers, args.experts)
    print(f"\nT={size} over {backend} against one process, {args.layers} layers, width {cfg.dim}, {args.experts} "
          f"experts, vocab {cfg.vocab_size}; {args.threads} threads in all; fastest of {args.rounds} rounds; "
          f"load average before the run {load:.1f}")
    share = max(1, args.threads // size)
    # work: T x the T ranks' time over one process's on one rank's threads (1.00: splitting costs nothing).
    # comms: the step's collectives alone, issued back to back (a floor on the ranks' added time).
    print(f"{'dtype':9} {'step':20} {'T=1 ms':>8} {f'T={size} ms':>8} {'ratio':>6} {f'T=1 {share}thr ms':>11} "
          f"{'work':>6} {'comms ms':>9}")
    for name, runs in costs.items():
        for kind, label in (("prefill", f"prefill {args.prefill} tokens"), ("decode", "decode, batch 1")):
            one, thin, many = (min(r[kind] for r in runs[case]) for case in ("one", "one_thin", "tp"))
            print(f"{name:9} {label:20} {one * 1e3:8.2f} {many * 1e3:8.2f} {many / one:5.2f}x {thin * 1e3:11.2f} "
                  f"{size * many / thin:5.2f}x {runs['collectives'][kind] * 1e3:9.2f}")
    for name, runs in costs.items():
        r = runs["tp"][0]
        for kind in ("prefill", "decode"):
            print(f"{name} {kind} step, collectives of rank 0: {_kinds(r[f'{kind}_counts'])}; "
                  f"bytes: {_sizes(r[f'{kind}_bytes'])}")
    if args.device != "cuda":
        print("NCCL (--device cuda): not run here (no GPU)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2], help="tensor-parallel sizes timed against T=1")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=256, help="tokens of the timed prefill step")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="threads in all: T=1 takes them all, each rank 1/T")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NCCL, one GPU a rank")
    ap.add_argument("--quick", action="store_true", help="2 layers, float32, 8 steps, 2 rounds (a smoke test)")
    ap.add_argument("--memory-only", action="store_true", help="only the Scout / Maverick memory table")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.dtypes, args.steps, args.rounds, args.prefill = 2, ["float32"], 8, 2, 128
    if args.device == "cuda" and torch.cuda.device_count() < max(args.sizes):
        ap.error(f"--device cuda needs {max(args.sizes)} GPUs, found {torch.cuda.device_count()}")
    if not args.memory_only:
        load = os.getloadavg()[0]  # other work on this machine
        costs = {T: step_costs(args, T) for T in args.sizes}
        for T, c in costs.items():
            print_costs(args, T, c, load)
    print_memory(memory_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
