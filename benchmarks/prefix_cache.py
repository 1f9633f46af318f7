"""Time to first token with automatic prefix caching: a 2,000-token shared prefix (a system prompt)
plus a short question, cold (nothing cached) against warm (the prefix cached by an earlier request
with another question), on the generation benchmark's model (bf16), side by side in one run.

    python benchmarks/prefix_cache.py [--dir FOLDER] [--rounds 3] [--prefix 2000] [--threads 2]

The goal is warm <= 0.2x cold. Tokens are checked equal to the cold request's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
from generation import bench_folder, bench_parser  # noqa: E402
from herd.engine.batch import Batcher, Job  # noqa: E402
from herd.engine.generate import Engine, Sampling  # noqa: E402
from herd.engine.prefix import PrefixCache  # noqa: E402


def first_token(batcher: Batcher, ids: list[int]) -> tuple[float, int]:
    job = Job(ids, 1, Sampling())
    t = time.perf_counter()
    batcher.add(job)
    elapsed = time.perf_counter() - t
    while batcher.seats:
        batcher.step()
    return elapsed, job.token_ids[0]


def main(argv=None) -> int:
    args = bench_parser(__doc__, prefix=2000).parse_args(argv)
    llm = herd.load(bench_folder(args), dtype="bfloat16", progress=False)
    tok = llm.tokenizer
    system = tok.encode("You are a careful assistant for a library of llama facts. " * 200, bos=True)[:args.prefix]
    questions = [tok.encode(f" Question {i}: how tall is a llama, in metres?") for i in range(args.rounds + 1)]
    engine = Engine(llm.model, rows=1, max_len=args.prefix + 64)
    cold, warm = [], []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        t_cold, tok_cold = first_token(Batcher(engine, tok), system + questions[r + 1])
        prefixes = PrefixCache(8 << 30)
        first_token(Batcher(engine, tok, prefixes=prefixes), system + questions[0])  # caches the prefix
        t_warm, tok_warm = first_token(Batcher(engine, tok, prefixes=prefixes), system + questions[r + 1])
        assert tok_warm == tok_cold and prefixes.reused_tokens >= args.prefix - 8
        cold.append(t_cold)
        warm.append(t_warm)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\n{args.threads} threads, bf16, {args.prefix}-token shared prefix + {len(questions[1])}-token question, "
          f"median of {args.rounds} rounds, time to first token")
    print(f"cold {1e3 * c:.0f} ms  warm {1e3 * w:.0f} ms  ratio {w / c:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
