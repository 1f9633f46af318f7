"""Prompt-lookup decoding against plain decoding, batch 1, greedy, on the generation benchmark's model
(random weights, bf16) and on herd-tiny, side by side in one run.

    python benchmarks/speculate.py [--dir FOLDER] [--rounds 3] [--tokens 64] [--threads 2]

Rows:
  - text that repeats nothing (a story; the random model's own output): lookup finds few n-grams,
    its drafts fail and back off; the cost of trying.
  - drafts that are right: the drafts are the tokens plain decoding produced (an oracle in place of
    the lookup), what a reply that copies its prompt gives. No model here copies text (herd-tiny's
    induction score is 6%), so this row stands in for quoting and editing tasks with a real model.
The tokens are plain decoding's in float32; in bf16 a step over several tokens rounds differently
from one over a single token, so a near tie can break the other way: the table gives how many of
the tokens agree with plain decoding's.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
import herd.engine.batch as batch  # noqa: E402
from generation import bench_folder, bench_parser  # noqa: E402

STORY = "Once upon a time, Mia found a small red kite in the garden behind her house. "


def rate(llm, prompt: str, tokens: int, speculate: int, oracle: list[int] | None = None) -> tuple[float, list[int]]:
    llm.speculate = speculate
    real = batch.lookup
    if oracle is not None:
        start = len(llm.tokenizer.encode(prompt, bos=True))
        batch.lookup = lambda ids, k: list(oracle[len(ids) - start:len(ids) - start + k])
    try:
        t = time.perf_counter()
        g = llm.generate(prompt, max_new_tokens=tokens, logit_bias={i: -100.0 for i in llm.tokenizer.stop_ids})
        return len(g.token_ids) / (time.perf_counter() - t - g.prefill_s), g.token_ids
    finally:
        batch.lookup = real


def main(argv=None) -> int:
    args = bench_parser(__doc__, tokens=64).parse_args(argv)
    folder = bench_folder(args)
    # float32: there a step over several tokens computes exactly what single steps do, so the oracle's
    # drafts (plain decoding's tokens) stay right; bf16 rounds the two differently (see above).
    models = {"benchmark model, float32": herd.load(folder, progress=False),
              "benchmark model, bf16": herd.load(folder, dtype="bfloat16", progress=False),
              "herd-tiny": herd.load("herd-tiny", progress=False)}
    results = {}
    for name, llm in models.items():
        _, plain_tokens = rate(llm, STORY, args.tokens, 0)
        cases = {"repeats nothing": None, "drafts that are right": plain_tokens}
        for case, oracle in cases.items():
            runs, same = {"plain": [], "lookup": []}, []
            for r in range(args.rounds):
                print(f"{name}, {case}: round {r + 1}/{args.rounds}", file=sys.stderr)
                for how, k in (("plain", 0), ("lookup", 4)):
                    tps, got = rate(llm, STORY, args.tokens, k, oracle if k else None)
                    if k:
                        same.append(next((i for i, (a, b) in enumerate(zip(got, plain_tokens)) if a != b), len(got)))
                    runs[how].append(tps)
            results[(name, case)] = (statistics.median(runs["plain"]), statistics.median(runs["lookup"]), min(same))
    print(f"\n{args.threads} threads, batch 1, greedy, {args.tokens} tokens, median of {args.rounds} interleaved "
          f"rounds, decode tokens/s")
    print(f"{'model':26} {'case':22} {'plain':>8} {'lookup':>8} {'ratio':>7} {'tokens as plain':>16}")
    for (name, case), (plain, fast, same) in results.items():
        print(f"{name:26} {case:22} {plain:8.1f} {fast:8.1f} {fast / plain:6.2f}x {f'first {same}/{args.tokens}':>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
