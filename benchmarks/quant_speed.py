"""Batch-1 decode and 512-token prefill with int8 / int4 weights against bf16, and llama.cpp's Q8_0 /
Q4_0 of the same checkpoint, on the generation benchmark's model (benchmarks/generation.py).

    python benchmarks/quant_speed.py [--dir FOLDER] [--rounds 3] [--steps 32] [--threads 2] [--llamacpp]

herd's three variants are timed in interleaved rounds (bf16, int8, int4, bf16, ...) and the median
is reported, so a slow spell of the machine hits all alike. The quantized runs quantize every linear
llama.cpp's Q8_0 / Q4_0 do (experts, shared expert, attention, output head); int4 uses groups of 32
like Q4_0.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
from generation import LLAMACPP, bench_folder, bench_parser, herd_decode, herd_prefill  # noqa: E402
from herd.kernels import quant  # noqa: E402

VARIANTS = {"bf16": {}, "int8": dict(quantize="int8"), "int4": dict(quantize="int4", quantize_group=32)}


def main(argv=None) -> int:
    ap = bench_parser(__doc__, steps=32)
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp's bench.sh in q8_0 and q4_0")
    args = ap.parse_args(argv)
    folder = bench_folder(args)
    models = {name: herd.load(folder, dtype="bfloat16", progress=False, quantize_modules=quant.MODULES, **kw)
              for name, kw in VARIANTS.items()}
    decode = {name: [] for name in models}
    prefill = {name: [] for name in models}
    for r in range(args.rounds):
        for name, llm in models.items():
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr)
            decode[name].append(herd_decode(llm.model, 1, args.steps))
            prefill[name].append(herd_prefill(llm.model, 512))
    rates = {name: (statistics.median(decode[name]), statistics.median(prefill[name])) for name in models}
    theirs = {}
    if args.llamacpp:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for kind in ("q8_0", "q4_0"):
            out = subprocess.run(["bash", str(LLAMACPP / "bench.sh"), str(folder), kind, str(args.threads)],
                                 capture_output=True, text=True, env=env)
            theirs[kind] = {line.split()[1].rstrip(":"): float(line.split()[2]) for line in out.stdout.splitlines()}
    print(f"\n{args.threads} threads, median of {args.rounds} interleaved rounds, tokens/s")
    print(f"{'weights':8} {'decode b1':>10} {'vs bf16':>8} {'prefill 512':>12} {'vs bf16':>8} {'llama.cpp tg / pp':>20}")
    for name, (dec, pre) in rates.items():
        other = theirs.get({"int8": "q8_0", "int4": "q4_0"}.get(name, ""), {})
        cpp = f"{other.get('tg128', float('nan')):.1f} / {other.get('pp512', float('nan')):.1f}" if other else ""
        print(f"{name:8} {dec:10.1f} {dec / rates['bf16'][0]:7.2f}x {pre:12.1f} {pre / rates['bf16'][1]:7.2f}x {cpp:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
