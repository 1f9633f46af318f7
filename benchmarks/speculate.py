"""Prompt-lookup decoding against plain decoding, batch 1, greedy, on the generation benchmark's model
(random weights), on herd-tiny, and on a decoder of herd-tiny's kind that has learned to repeat what
it was shown, side by side in one run.

    python benchmarks/speculate.py [--dir FOLDER] [--rounds 3] [--tokens 64] [--threads 2]

Rows:
  - text that repeats nothing (a story; the random model's own output): lookup finds few n-grams,
    its drafts fail and back off; the cost of trying.
  - drafts that are right: the drafts are the tokens plain decoding produced (an oracle in place of
    the lookup), what a reply that copies its prompt gives at best.
  - a reply that repeats its prompt, real drafts: herd-tiny does not copy text (its induction score
    is 6%), so the copying decoder is the lookup probe's (experiments/herd_tiny/probe.py) trained on
    word lists alone ("Words: w1 ... wn. Again: w1 ... wn."), asked to repeat a fresh list of 60
    words. Trained on the first run (1,200 steps, about 7 minutes) and kept beside the benchmark
    model (FOLDER-copier, its weights as trained in FOLDER-copier.safetensors). The table gives how many of its tokens repeat the list.
The tokens are plain decoding's in float32; in bf16 a step over several tokens rounds differently
from one over a single token, so a near tie can break the other way: the table gives how many of
the tokens agree with plain decoding's.
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import herd  # noqa: E402
import herd.engine.batch as batch  # noqa: E402
from generation import bench_folder, bench_parser  # noqa: E402
from herd.checkpoint.load import save_hf  # noqa: E402

STORY = "Once upon a time, Mia found a small red kite in the garden behind her house. "


def copier(folder: Path) -> Path:
    """The copying decoder (module docstring) as a herd folder with herd-tiny's tokenizer, trained once."""
    from experiments.herd_tiny.probe import DEFAULT_TOKENIZER, ProbeConfig, build_model, probe
    from herd.tokenizer.tokenizer import Tokenizer
    from herd.train.trainer import load_start

    if (folder / "config.json").exists():
        return folder
    weights = folder.parent / f"{folder.name}.safetensors"  # save_hf writes only into a new folder
    cfg = ProbeConfig(seed=1, grow=16, switch=0.6, facts=0.0, facts_at=1000, steps=1200, every=100, save=str(weights))
    if not weights.exists():
        probe(cfg, log=lambda line: print(f"training the copying decoder: {line}", file=sys.stderr, flush=True))
    model = build_model(cfg, Tokenizer.from_hf_json(DEFAULT_TOKENIZER).vocab_size)
    load_start(model, weights, "the copying decoder", "its weights")
    save_hf(model.eval(), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_TOKENIZER.with_name(name), folder / name)
    return folder


def word_list(n: int, seed: int) -> tuple[str, str]:
    """A prompt listing ``n`` words and asking for them again (the probe's documents), and the repetition."""
    from experiments.herd_tiny import text
    from experiments.herd_tiny.evaluate import vocabulary

    pieces = text.word_list(random.Random(seed), sorted(vocabulary(random.Random(0))), n)
    return "".join(pieces[:3]), "".join(pieces[3:])


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
              "herd-tiny": herd.load("herd-tiny", progress=False),
              "copying decoder": herd.load(copier(folder.parent / f"{folder.name}-copier"), progress=False)}
    listed, repetition = word_list(60, seed=7)
    want = models["copying decoder"].tokenizer.encode(repetition)
    results, copied = {}, None
    for name, llm in models.items():
        # case -> (prompt, whether the drafts are an oracle's: plain decoding's tokens)
        cases = ({"repeats its prompt": (listed, False)} if name == "copying decoder" else
                 {"repeats nothing": (STORY, False), "drafts that are right": (STORY, True)})
        for case, (prompt, oracle) in cases.items():
            _, plain_tokens = rate(llm, prompt, args.tokens, 0)
            if case == "repeats its prompt":
                copied = next((i for i, (a, b) in enumerate(zip(plain_tokens, want)) if a != b), len(plain_tokens))
            runs, same = {"plain": [], "lookup": []}, []
            for r in range(args.rounds):
                print(f"{name}, {case}: round {r + 1}/{args.rounds}", file=sys.stderr)
                for how, k in (("plain", 0), ("lookup", 4)):
                    tps, got = rate(llm, prompt, args.tokens, k, plain_tokens if k and oracle else None)
                    if k:
                        same.append(next((i for i, (a, b) in enumerate(zip(got, plain_tokens)) if a != b), len(got)))
                    runs[how].append(tps)
            results[(name, case)] = (statistics.median(runs["plain"]), statistics.median(runs["lookup"]), min(same))
    print(f"\n{args.threads} threads, batch 1, greedy, {args.tokens} tokens, median of {args.rounds} interleaved "
          f"rounds, decode tokens/s")
    print(f"{'model':26} {'case':22} {'plain':>8} {'lookup':>8} {'ratio':>7} {'tokens as plain':>16}")
    for (name, case), (plain, fast, same) in results.items():
        print(f"{name:26} {case:22} {plain:8.1f} {fast:8.1f} {fast / plain:6.2f}x {f'first {same}/{args.tokens}':>16}")
    print(f"\nThe copying decoder's plain reply repeats the first {copied} of the list's "
          f"{len(want)} tokens (it was asked for {args.tokens}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
