"""The `herd` command. Each subcommand imports its work lazily, so `herd --help` is instant."""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_MODEL = "tiny-moe"  # until herd-tiny (a trained model) ships, a tiny RANDOM model


def _warn_if_random(model: str) -> None:
    from herd.config import PRESETS

    if model in PRESETS:
        print(f"herd: NOTE: '{model}' is a preset with RANDOM weights (no trained model is embedded yet), so its "
              f"output is gibberish. Pass --model PATH to use a real checkpoint.", file=sys.stderr)


def cmd_generate(args) -> int:
    import herd
    from herd.engine.generate import generate_tokens
    from herd.tokenizer.tokenizer import StreamDecoder

    _warn_if_random(args.model)
    llm = herd.load(args.model, dtype=args.dtype, device=args.device)
    tok = llm.tokenizer
    if args.raw:
        prompt = tok.encode(args.prompt, bos=True)
    else:
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    stream, start, n = StreamDecoder(tok), time.perf_counter(), 0
    for n, t in enumerate(generate_tokens(llm.model, prompt, args.max_new_tokens, tok.stop_ids,
                                          args.temperature, args.top_k, args.top_p, args.seed), 1):
        if t in tok.stop_ids:
            break
        print(stream.push(t), end="", flush=True)
    print(stream.flush())
    dt = time.perf_counter() - start
    print(f"herd: {n} tokens in {dt:.2f} s ({n / dt:.1f} tokens/s), prompt {len(prompt)} tokens", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from herd.checkpoint.load import read_config
    from herd.config import PRESETS, preset

    cfg = preset(args.model) if args.model in PRESETS else read_config(args.model)[0]
    t = cfg.text
    print(f"model: {args.model} ({cfg.note or cfg.name})")
    print(f"params: {cfg.param_count() / 1e9:.2f}B total, {cfg.param_count(active=True) / 1e9:.2f}B active per token")
    print(f"text: {t.n_layers} layers, width {t.dim}, heads {t.n_heads}/{t.n_kv_heads} x {t.head_dim}, "
          f"vocab {t.vocab_size}")
    nope = [i for i, r in enumerate(t.uses_rope) if not r]
    moe = [i for i, m in enumerate(t.is_moe) if m]
    print(f"NoPE layers: {nope}")
    if t.moe:
        print(f"MoE layers: {moe} ({t.moe.num_experts} experts of width {t.moe.expert_dim}, top-{t.moe.top_k}, "
              f"+ shared expert); dense FFN width {t.ffn_dim}")
    print(f"attention chunk: {t.attention_chunk_size}, rope theta {t.rope_theta}, scaling {t.rope_scaling}")
    return 0


def cmd_convert(args) -> int:
    import herd

    llm = herd.load(args.src, dtype=args.dtype)
    out = llm.save_pretrained(args.dst)
    print(f"herd: wrote Hugging Face checkpoint {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="Llama 4 (Scout, Maverick, Behemoth) in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (as a chat turn unless --raw)")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint folder (Hugging Face or Meta) or preset name (default: {DEFAULT_MODEL}, random)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="config and parameter counts of a checkpoint or preset (no weights read)")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="load any supported checkpoint and write it in Hugging Face format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # herd's errors (config, checkpoint, tokenizer) are ValueErrors with a clear message
        print(f"herd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
