"""Batch-1 decode and 512-token prefill with int8 / int4 weights against bf16, and llama.cpp's Q8_0 /
Q4_0 of the same checkpoint, on the generation benchmark's model (benchmarks/generation.py).

    python benchmarks/quant_speed.py [--dir FOLDER] [--rounds 3] [--steps 32] [--threads 2] [--llamacpp]
                                     [--scout-slice] [--avx2]

herd's three variants are timed in interleaved rounds (bf16, int8, int4, bf16, ...) and the median
is reported, so a slow spell of the machine hits all alike. The quantized runs quantize every linear
llama.cpp's Q8_0 / Q4_0 do (experts, shared expert, attention, output head); int4 uses groups of 32
like Q4_0. ``--scout-slice`` then times the same three on generation.py's Scout-shaped slice (2 layers
of Scout's widths, 16 experts of 8192 and the shared one, herd-tiny's vocabulary of 3072; a 9 GB bf16 checkpoint
written once beside the benchmark model; about 16 GB of memory while all three are loaded), int4 in
groups of 128 as Scout would run. ``--avx2`` times the three as a CPU with AVX2 but no AVX-512 would run
them (most desktops), emulated on this one: torch's and oneDNN's AVX2 code paths (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA), herd's AVX2 build of its kernels, no bf16 GEMMs; the memory is this machine's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import herd  # noqa: E402
from generation import (LLAMACPP, bench_folder, bench_parser, herd_decode, herd_prefill,  # noqa: E402
                        scout_slice_config)
from herd.checkpoint.load import save_hf  # noqa: E402
from herd.kernels import cpu, native, quant  # noqa: E402
from herd.model.transformer import TextModel  # noqa: E402

BUNDLED = Path(herd.__file__).parent / "bundled" / "herd-tiny"
TOKENIZER = [p.name for p in BUNDLED.glob("tokenizer*")]
VARIANTS = {"bf16": {}, "int8": dict(quantize="int8"), "int4": dict(quantize="int4", quantize_group=32)}
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # read as torch starts


def main(argv=None) -> int:
    ap = bench_parser(__doc__, steps=32)
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp's bench.sh in q8_0 and q4_0")
    ap.add_argument("--scout-slice", action="store_true", help="also time the Scout-shaped slice (9 GB, 16 GB of memory)")
    ap.add_argument("--avx2", action="store_true", help="as on a CPU with AVX2 but no AVX-512 (emulated; no llama.cpp)")
    args = ap.parse_args(argv)
    if args.avx2:
        if any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
        native.FLAGS = native.AVX2_FLAGS
        cpu.native_half_gemm = lambda dtype: False  # as such a CPU answers (torch asks the hardware itself)
        args.llamacpp = False  # its build is for this CPU
        print(f"AVX2 emulated: torch {torch.backends.cpu.get_cpu_capability()}, herd's kernels level {native.level()}",
              file=sys.stderr)
    folder = bench_folder(args)
    rates = timed_variants(folder, VARIANTS, args.rounds, args.steps)
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
    if args.scout_slice:
        variants = {**VARIANTS, "int4": dict(quantize="int4", quantize_group=128)}
        rates = timed_variants(scout_slice(folder.parent / f"{folder.name}-scout-slice"), variants, args.rounds, 8)
        print(f"\nScout-shaped slice (2 layers), {args.threads} threads, median of {args.rounds} interleaved rounds")
        print(f"{'weights':8} {'decode ms/step':>15} {'vs bf16':>8} {'prefill 512 tok/s':>18} {'vs bf16':>8}")
        for name, (dec, pre) in rates.items():
            print(f"{name:8} {1e3 / dec:15.1f} {dec / rates['bf16'][0]:7.2f}x {pre:18.1f} {pre / rates['bf16'][1]:7.2f}x")
    return 0


def timed_variants(folder: Path, variants: dict, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    """name -> (median decode tokens/s at batch 1, median tokens/s of a 512-token prefill), the variants
    loaded side by side and timed in interleaved rounds."""
    models = {name: herd.load(folder, dtype="bfloat16", progress=False, quantize_modules=quant.MODULES, **kw)
              for name, kw in variants.items()}
    decode = {name: [] for name in models}
    prefill = {name: [] for name in models}
    for r in range(rounds):
        for name, llm in models.items():
            print(f"{folder.name}, round {r + 1}/{rounds}: {name} ...", file=sys.stderr)
            decode[name].append(herd_decode(llm.model, 1, steps))
            prefill[name].append(herd_prefill(llm.model, 512))
    return {name: (statistics.median(decode[name]), statistics.median(prefill[name])) for name in models}


def scout_slice(folder: Path) -> Path:
    """generation.py's Scout-shaped slice as a bf16 checkpoint, written once (built in bf16: in float32
    it would need 17 GB)."""
    if (folder / "config.json").exists():
        return folder
    cfg = scout_slice_config(vocab_size=3072)  # herd-tiny's tokenizer
    print(f"writing the Scout-shaped slice ({cfg.param_count() / 1e9:.1f}B parameters) to {folder} ...", file=sys.stderr)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = TextModel(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    save_hf(model, folder)
    for name in TOKENIZER:
        shutil.copy(BUNDLED / name, folder / name)
    return folder


if __name__ == "__main__":
    sys.exit(main())
