"""Peak resident memory while loading a checkpoint, as a multiple of the loaded model's size.

    python benchmarks/load_memory.py [--gb 1.2] [--formats hf meta] [--dtypes bfloat16 float32] [--quantize int4]
                                     [--kv-heads 2] [--tp T [--ep]] [--pp P]

Writes a random Llama 4-shaped checkpoint of about --gb gigabytes (bf16 on disk) in each format,
then loads it with herd.load in a fresh subprocess per case and reports
(peak RSS during load - RSS before load) / bytes of the loaded model (quantized, with --quantize: the
experts are quantized as they stream in). The target is <= 1.2 (<= 1.3 quantized).
The tokenizer (a fixed ~80 MB, whatever the model's size) is built before the "before" figure and
reported in its own column. ``--tp T`` loads rank 0's shard only, read by slices (`steps.load`'s
path, without a process group): "model GB" is then the shard's size. ``--pp P``: rank 0 of stage 0
of P pipeline stages (its layers, and the embedding), read alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herd.config import ModelConfig, MoEConfig, TextConfig, every, rope_layout  # noqa: E402


def bench_config(gb: float, kv_heads: int = 2) -> TextConfig:
    """Width 1024, 16 experts of width 1024, every layer MoE; layers chosen to reach ~gb in bf16."""
    dim, vocab = 1024, 202_048
    per_layer = 16 * 3 * dim * 1024 + 3 * dim * 1024 + 4 * dim * dim + 16 * dim
    n_layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * dim) / per_layer))
    return TextConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=8, n_kv_heads=kv_heads, head_dim=128,
                      ffn_dim=4096, uses_rope=rope_layout(n_layers, 4), is_moe=every(n_layers, 1),
                      moe=MoEConfig(16, 1, 1024), attention_chunk_size=8192)


def write_checkpoints(cfg: TextConfig, root: Path, formats: list[str]) -> dict[str, Path]:
    from herd.checkpoint.load import save_hf
    from herd.config import to_meta_params
    from herd.model.init import init_weights
    from herd.model.transformer import TextModel

    print(f"writing a {cfg.param_count() / 1e9:.2f}B-parameter checkpoint ...", file=sys.stderr)
    model = init_weights(TextModel(cfg)).to(torch.bfloat16)
    out = {}
    if "hf" in formats:
        out["hf"] = save_hf(model, root / "hf")
    if "meta" in formats:
        from herd.checkpoint.meta import to_meta

        folder = root / "meta"
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(to_meta_params(ModelConfig(cfg))))
        for i, shard in enumerate(to_meta(model.state_dict(), cfg)):
            torch.save(shard, folder / f"consolidated.{i:02d}.pth")
        out["meta"] = folder
    return out


_CHILD = r"""
import json, sys
def status(field):
    # VmHWM is this process's own peak (ru_maxrss can inherit the parent's peak across exec).
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
import herd
from herd.checkpoint.load import read_config
from herd.tokenizer import Tokenizer
from herd.llm import load
cfg, _ = read_config(sys.argv[1])
start = status("VmRSS")
Tokenizer.from_folder(sys.argv[1], cfg.text.vocab_size)  # cached: herd.load reuses it
before = status("VmRSS")
quantize = None if sys.argv[3] == "none" else sys.argv[3]
shard = None
if int(sys.argv[4]) * int(sys.argv[6]) > 1:
    from herd.distributed.pipeline import stage_parts
    from herd.distributed.tensor import TensorParallel
    tp = TensorParallel(0, int(sys.argv[4]), expert_parallel=sys.argv[5] == "ep", stages=int(sys.argv[6]))
    shard = lambda model: stage_parts(model, tp)
llm = herd.load(sys.argv[1], dtype=sys.argv[2], progress=False, quantize=quantize, shard=shard)
peak = status("VmHWM")
size = sum(t.numel() * t.element_size() for t in llm.model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "model_bytes": size, "tokenizer": before - start}))
"""


def measure(folder: Path, dtype: str, quantize: str | None = None, tp: int = 1, ep: bool = False,
            pp: int = 1) -> dict:
    """Load in a fresh process (so peaks do not mix) and return its memory figures."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), dtype, quantize or "none", str(tp),
                           "ep" if ep else "tp", str(pp)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["ratio"] = (r["peak"] - r["before"]) / r["model_bytes"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.2, help="checkpoint size on disk (bf16)")
    ap.add_argument("--formats", nargs="+", default=["hf", "meta"], choices=["hf", "meta"])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None, help="quantize the experts while loading")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads (--tp may not exceed them)")
    ap.add_argument("--tp", type=int, default=1, help="load rank 0 of T tensor-parallel ranks, by slices")
    ap.add_argument("--ep", action="store_true", help="with --tp: whole experts per rank")
    ap.add_argument("--pp", type=int, default=1, help="load rank 0 of stage 0 of P pipeline stages")
    ap.add_argument("--json", action="store_true", help="print one JSON object per case instead of a table")
    args = ap.parse_args(argv)
    cfg = bench_config(args.gb, args.kv_heads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("HERD_BENCH_TMP")) as tmp:
        folders = write_checkpoints(cfg, Path(tmp), args.formats)
        if not args.json:
            print(f"{'format':6} {'file GB':>8} {'load as':>14} {'model GB':>9} {'peak-before GB':>15} {'ratio':>6} "
                  f"{'tokenizer MB':>13}")
        for fmt, folder in folders.items():
            disk = sum(f.stat().st_size for f in folder.iterdir())
            for dtype in args.dtypes:
                r = measure(folder, dtype, args.quantize, args.tp, args.ep, args.pp)
                if args.json:
                    print(json.dumps({"format": fmt, "dtype": dtype, "disk": disk, **r}))
                else:
                    how = dtype + (f"+{args.quantize}" if args.quantize else "") + (
                        f" T={args.tp}{'EP' if args.ep else ''}" if args.tp > 1 else "") + (
                        f" P={args.pp}" if args.pp > 1 else "")
                    print(f"{fmt:6} {disk / 1e9:8.2f} {how:>14} {r['model_bytes'] / 1e9:9.2f} "
                          f"{(r['peak'] - r['before']) / 1e9:15.2f} {r['ratio']:6.2f} {r['tokenizer'] / 1e6:13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
