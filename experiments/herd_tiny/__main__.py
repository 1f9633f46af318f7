"""python -m experiments.herd_tiny data OUT | encoder OUT | package FINAL DEST | eval MODEL [--report FILE] | probe [...]
(see scripts/train-herd-tiny)."""

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.herd_tiny", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="build herd-tiny's tokenizer, config.json and training data into OUT")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--first-build", action="store_true", help="the first build's data and architecture (8 layers, "
                   "NoPE at 3 and 7, a text-first block, no pictures split; no fact lookups formed: README, herd-tiny) "
                   "instead of the shipped build's (4 layers for the lookup probe's decoder: experiments/herd_tiny/build.py)")
    v = sub.add_parser("encoder", help="pretrain herd-tiny's vision encoder on the generator's labels "
                       "(writes DATA/encoder.safetensors, the recipe's model.vision_init)")
    v.add_argument("data", help="the folder `data` wrote (its config.json gives the encoder)")
    v.add_argument("--steps", type=int, default=1000)
    v.add_argument("--token-labels", action="store_true", help="also learn, per image token, which coloured shape "
                   "covers it (experiments/herd_tiny/encoder.py)")
    v.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p = sub.add_parser("package", help="write a trained model (bf16) + loss curve into DEST, e.g. herd/bundled/herd-tiny")
    p.add_argument("final", help="the run's exported model (OUT_DIR/final)")
    p.add_argument("dest")
    p.add_argument("--run", action="append", default=[], help="a training run's folder, once per stage in order "
                   "(loss curves copied, stages summed up in README.md)")
    e = sub.add_parser("eval", help="evaluate a herd-tiny checkpoint on fresh generated examples")
    e.add_argument("model")
    e.add_argument("--report", help="write the report (markdown) here")
    e.add_argument("--seed", type=int, default=12345, help="seed of the fresh examples (not the training seeds)")
    e.add_argument("--n", type=int, default=200, help="examples per task")
    pr = sub.add_parser("probe", help="train a small decoder on word lists and fact lookups and print how well it "
                        "copies within and beyond one attention chunk (see experiments/herd_tiny/probe.py)")
    from experiments.herd_tiny.probe import add_arguments
    add_arguments(pr)
    pr.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    pr.add_argument("--tokenizer", help="the tokenizer.json to use (default: the shipped herd-tiny's)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # bad options or files: the message names them
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    if getattr(args, "threads", 0):
        import torch
        torch.set_num_threads(args.threads)
    if args.cmd == "data":
        from experiments.herd_tiny.build import build
        print(f"herd-tiny data in {build(args.out, seed=args.seed, lookups=not args.first_build)}")
    elif args.cmd == "encoder":
        from pathlib import Path

        from experiments.herd_tiny.encoder import pretrain_encoder
        out = Path(args.data) / "encoder.safetensors"
        r = pretrain_encoder(Path(args.data) / "config.json", out, steps=args.steps, token_labels=args.token_labels)
        print(f"herd-tiny encoder in {out}: {r['steps']} steps, {r['seconds']:.0f} s, last 50 steps: loss "
              f"{r['loss']:.3f}, {r['accuracy']:.1%} of pictures with every colour's shape right; fresh pictures: "
              f"single shape: shape {r['shape']:.1%}, colour {r['color']:.1%}; 1-3 shapes: count {r['count']:.1%}, "
              f"every label {r['all']:.1%}")
    elif args.cmd == "package":
        from experiments.herd_tiny.build import package
        print(f"herd-tiny packaged in {package(args.final, args.dest, args.run)}")
    elif args.cmd == "probe":
        from experiments.herd_tiny.probe import DEFAULT_TOKENIZER, config_from, probe
        probe(config_from(args), args.tokenizer or DEFAULT_TOKENIZER, log=lambda line: print(line, flush=True))
    else:
        from experiments.herd_tiny.evaluate import evaluate, report
        results = evaluate(args.model, seed=args.seed, n=args.n)
        text = report(results, args.model)
        print(text)
        if args.report:
            with open(args.report, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
