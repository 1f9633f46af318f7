"""The cost of structured outputs: batch-1 decode with replies constrained to a JSON schema against
free decode, on the generation benchmark's model (width 1024, 8 layers, 16 experts, Llama 4's
202,048-token vocabulary, bf16) — the grammar's work per token grows with the vocabulary, not the model.

    python benchmarks/structured.py [--dir FOLDER] [--rounds 3] [--tokens 64] [--threads 2]

Both are timed in interleaved rounds (free, constrained, free, ...); the median time per decoded
token is reported, and their ratio (the goal is <= 1.15).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
from generation import bench_folder, bench_parser  # noqa: E402

# Long strings and arrays, so a random model's constrained reply runs to the token budget.
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}, "score": {"type": "number"}}, "required": ["title", "tags", "score"]}


def main(argv=None) -> int:
    args = bench_parser(__doc__, tokens=64).parse_args(argv)
    folder = bench_folder(args)
    llm = herd.load(folder, dtype="bfloat16", progress=False)
    prompt = [{"role": "user", "content": "Describe a llama as JSON."}]
    llm.generate(prompt, max_new_tokens=4, json_schema=SCHEMA)  # builds llguidance's view of the vocabulary once
    no_stop = {t: -100.0 for t in llm.tokenizer.stop_ids}  # both run to the token budget
    per_token = {"free": [], "constrained": []}
    for r in range(args.rounds):
        for name, kw in (("free", {}), ("constrained", {"json_schema": SCHEMA})):
            print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr)
            g = llm.generate(prompt, max_new_tokens=args.tokens, logit_bias=no_stop, **kw)
            assert len(g.token_ids) == args.tokens, (name, len(g.token_ids))
            per_token[name].append(g.decode_s / (args.tokens - 1))
    free, constrained = (statistics.median(per_token[k]) for k in ("free", "constrained"))
    print(f"\n{args.threads} threads, batch 1, median of {args.rounds} interleaved rounds, ms per decoded token")
    print(f"free {1e3 * free:.2f}  constrained {1e3 * constrained:.2f}  ratio {constrained / free:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
