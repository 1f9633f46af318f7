"""The `herd` command. Each subcommand imports its work lazily, so `herd --help` is instant."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_MODEL = "herd-tiny"  # the small Llama 4 herd trained itself (herd/bundled/herd-tiny)


def _warn_if_random(model: str) -> None:
    from herd.config import PRESETS

    if model in PRESETS:
        print(f"herd: NOTE: '{model}' is a preset with RANDOM weights, so its output is gibberish. Leave out "
              f"--model for herd-tiny (trained), or pass --model PATH to a real checkpoint.", file=sys.stderr)


def _stream_reply(llm, prompt, args, prefix: str = "") -> str:
    """Print ``prefix`` and a reply as it is decoded; then its speed on stderr. Returns the text.

    Ctrl-C stops the reply after the token being made and returns what came so far: while it runs,
    SIGINT only sets a flag, so no KeyboardInterrupt can land between two statements of the caller.
    """
    stopped = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stopped.set())
    try:
        print(prefix, end="", flush=True)
        pieces = llm.stream(prompt, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed)
        text = []
        while not stopped.is_set():
            try:
                text.append(next(pieces))
            except StopIteration as done:
                result = done.value
                break
            print(text[-1], end="", flush=True)
        else:
            pieces.close()
            print("\nherd: (stopped)", file=sys.stderr)
            return "".join(text)
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    print(f"herd: {len(result.token_ids)} tokens, prompt {result.prompt_tokens} tokens: prefill {result.prefill_s:.2f} s, "
          f"decode {result.decode_tokens_per_s:.1f} tokens/s ({result.stop_reason})", file=sys.stderr)
    return result.text


def _load(args):
    import herd

    _warn_if_random(args.model)
    llm = herd.load(args.model, dtype=args.dtype, device=args.device, compile=args.compile, quantize=args.quantize,
                    quantize_group=args.quantize_group, kv_dtype=args.kv_dtype)
    if getattr(args, "speculate", None) == "ngram":
        llm.speculate = args.speculate_tokens
    return llm


def _run(args, lead) -> int:
    """``lead(llm)`` on the model ``args`` name; with ``--tp T`` (under torchrun) every rank loads its
    shard, rank 0 runs ``lead`` and the others the steps it plans (docs/distributed.md)."""
    if args.ep and args.tp < 2:
        raise ValueError("--ep splits the experts over the --tp processes: it needs --tp T with T >= 2")
    if args.tp * args.pp == 1:
        return lead(_load(args))
    import torch.distributed as dist

    from herd.distributed import steps

    llm, tp = steps.load(args.model, args.tp, device=args.device, pp_size=args.pp, expert_parallel=args.ep,
                         dtype=args.dtype, compile=args.compile, kv_dtype=args.kv_dtype, quantize=args.quantize,
                         quantize_group=args.quantize_group)
    try:
        if not tp.leader:
            steps.follow(llm.model, tp)
            return 0
        _warn_if_random(args.model)
        if getattr(args, "speculate", None) == "ngram":
            llm.speculate = args.speculate_tokens
        failed = False
        try:
            return lead(llm)
        except steps.GroupFailed:
            failed = True
            raise
        finally:
            if not failed:
                steps.stop(tp)  # the followers return
    except steps.GroupFailed as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.destroy_process_group()


def cmd_generate(args) -> int:
    from herd.images import load_image

    if args.raw and args.image:
        raise ValueError("--image needs the chat format (drop --raw)")
    for i, path in enumerate(args.image):  # before loading the model, not after
        load_image(path, index=i)
    content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": args.prompt}]
    prompt = args.prompt if args.raw else [{"role": "user", "content": content}]

    def lead(llm) -> int:
        _stream_reply(llm, prompt, args)
        return 0
    return _run(args, lead)


CHAT_HELP = ("commands: /image PATH attaches an image to the next message, /reset clears the history, "
             "/quit (or Ctrl-D) leaves; \"\"\" on a line of its own starts and ends a message of several lines; "
             "Ctrl-C stops a reply; // starts a message that begins with /")
TTY_LINE = 4095  # a terminal in canonical mode cuts a typed or pasted line here (Linux's N_TTY buffer)


def cmd_chat(args) -> int:
    """An interactive chat with history and line editing (readline); see CHAT_HELP."""
    try:
        import readline  # noqa: F401  (input() then edits lines, keeps history, and takes long pastes)
    except ImportError:  # not on every platform
        pass
    return _run(args, lambda llm: _chat(llm, args))


def _chat(llm, args) -> int:
    history = [{"role": "system", "content": args.system}] if args.system else []
    images: list[str] = []
    print(f"herd chat: type a message. {CHAT_HELP}.", file=sys.stderr)
    while True:
        try:
            line = _read_message()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            print("\nherd: (Ctrl-D or /quit leaves)", file=sys.stderr)
            continue
        if line is None:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                history, images = history[:1] if args.system else [], []
                print("herd: history cleared", file=sys.stderr)
            elif command == "/image" and rest.strip():
                problem = _image_problem(llm, rest.strip())
                if problem:
                    print(f"herd: {problem}; nothing attached", file=sys.stderr)
                else:
                    images.append(rest.strip())
                    print(f"herd: {len(images)} image(s) attached to the next message", file=sys.stderr)
            elif command == "/image":
                print("herd: /image needs a path: /image PATH", file=sys.stderr)
            else:
                print(f"herd: unknown command {command}; {CHAT_HELP}", file=sys.stderr)
            continue
        text = line[1:] if line.startswith("//") else line
        content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
        turn = history + [{"role": "user", "content": content}]
        images = []  # attached to this message, whatever becomes of it
        try:
            reply = _stream_reply(llm, turn, args, prefix="herd> ")
        except ValueError as e:  # a bad image or an over-long history: say so and keep chatting
            print(f"\nherd: error: {e}\nherd: the message was not sent (its images are dropped; /reset clears "
                  "the history)", file=sys.stderr)
            continue
        history = turn + [{"role": "assistant", "content": reply}]


def _read_message() -> str | None:
    """One message from the prompt: a line, or the lines between two lines of \"\"\". None: nothing to send."""
    line = input("you> ")
    if line.strip() == '"""':
        lines = []
        while (more := input("... ")).strip() != '"""':
            lines.append(more)
        return "\n".join(lines).strip() or None
    if len(line) == TTY_LINE:
        print(f"herd: warning: the line has {len(line)} characters; a terminal without line editing cuts "
              f"lines at {TTY_LINE}: paste long text between two lines of \"\"\"", file=sys.stderr)
    return line.strip() or None


def _image_problem(llm, path: str) -> str | None:
    """Why ``path`` cannot be attached, checked when /image is typed rather than at the next message."""
    from herd.images import ImageError, load_image

    if llm.vision is None:
        return f"{llm.source} takes no images (no vision encoder)"
    try:
        load_image(path, max_pixels=llm.tiler.max_pixels)
    except ImageError as e:
        return str(e)
    return None


def cmd_info(args) -> int:
    import torch

    from herd import kernels
    from herd.checkpoint.load import read_config
    from herd.config import PRESETS, preset
    from herd.bundled import model_folder

    is_preset = args.model in PRESETS and not Path(args.model).exists()
    cfg = preset(args.model) if is_preset else read_config(model_folder(args.model))[0]
    t, v = cfg.text, cfg.vision
    print(f"model: {args.model} ({cfg.note or cfg.name})")
    text_total = t.param_count()
    print(f"params: {_count(cfg.param_count())} total ({_count(text_total)} text"
          + (f", {_count(cfg.param_count() - text_total)} vision" if v else "")
          + f"), {_count(cfg.param_count(active=True))} active per token")
    print(f"text: {t.n_layers} layers, width {t.dim}, heads {t.n_heads}/{t.n_kv_heads} x {t.head_dim}, "
          f"vocab {t.vocab_size}, context {t.max_seq_len}")
    nope = [i for i, r in enumerate(t.uses_rope) if not r]
    moe = [i for i, m in enumerate(t.is_moe) if m]
    print(f"NoPE layers: {nope}")
    if t.moe:
        print(f"MoE layers: {moe} ({t.moe.num_experts} experts of width {t.moe.expert_dim}, top-{t.moe.top_k}, "
              f"+ shared expert); dense FFN width {t.ffn_dim}")
    print(f"attention chunk: {t.attention_chunk_size}, rope theta {t.rope_theta}, scaling {t.rope_scaling}")
    if v:
        print(f"vision: {v.n_layers} layers, width {v.dim}, heads {v.n_heads}; tiles of {v.image_size}x{v.image_size} "
              f"pixels in patches of {v.patch_size}, pixel shuffle {v.pixel_shuffle_ratio}")
    else:
        print("vision: none (text only)")
    from herd.engine.cache import resolve_kv_dtype
    import herd
    from herd.kernels import quant
    from herd.llm import memory, resolve_dtype

    dtype = resolve_dtype(args.dtype)
    # The meta device plans from the config (and a quantized checkpoint's headers), reading no weight.
    planned = herd.load(args.model, dtype=dtype, device="meta", quantize=args.quantize,
                        quantize_group=args.quantize_group, progress=False)
    model, encoder = planned.model, planned.vision
    # The cache herd.load would give on that device.
    kv_dtype = kernels.cache_dtype(dtype, args.device) if args.kv_dtype == "auto" else resolve_kv_dtype(args.kv_dtype)
    mem = memory(model, encoder, kv_dtype, args.context)
    held = sorted({f"{m.mode}" + (f" (group {m.group})" if m.mode == "int4" else "") for m in model.modules()
                   if isinstance(m, (quant.QuantLinear, quant.QuantExperts))})
    how = args.dtype + (f", quantized in {', '.join(held)}" if held else "")
    kv = str(kv_dtype).removeprefix("torch.") + (" with float32 scales" if kv_dtype == torch.int8 else "")
    per_token = f" ({mem['kv_cache'] / args.context / 2**10:.1f} KiB per token)" if args.context else ""
    print(f"memory ({how}; KV cache in {kv} for {args.context} tokens on "
          f"{args.device}): experts {_gib(mem['experts'])}, other text weights {_gib(mem['other'])}, "
          f"vision {_gib(mem['vision'])}, KV cache {_gib(mem['kv_cache'])}{per_token}; total {_gib(mem['total'])}")
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_perplexity(args) -> int:
    import herd
    from herd.evaluate import quality

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"herd: --text {args.text}: {e}", file=sys.stderr)
        return 2
    if args.compare and args.quantize is None and args.kv_dtype == "auto" and args.reference is None:
        print("herd: --compare scores a quantized model (--quantize) or KV cache (--kv-dtype) against the "
              "model without them, or against --reference; add one", file=sys.stderr)
        return 2
    llm = _load(args)
    ids = llm.tokenizer.encode(text, bos=True)
    # A chosen cache only matters where K/V are read back from it: score through the cache then.
    cached = args.kv_dtype != "auto"
    reference = None
    if args.compare or args.reference:  # a quantized checkpoint's reference is its unquantized original
        reference = herd.load(args.reference or args.model, dtype=args.dtype, device=args.device)
    q = quality(llm, ids, reference, window=args.window, cached=cached)
    print(f"{q.tokens} tokens of {args.text}" + (f" (through a KV cache in {args.kv_dtype})" if cached else "")
          + f": perplexity {q.perplexity:.4f}")
    if reference is not None:
        what = args.reference or "unquantized, default KV cache"
        print(f"reference ({what}) perplexity {q.reference_perplexity:.4f}; mean KL "
              f"divergence {q.mean_kl:.5f} nats/token; top-1 agreement {100 * q.top1_agreement:.2f}%")
    return 0


def _count(n: int) -> str:
    """A parameter count people read: 109.0B, 5.12M, 37.9K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.1f}{unit}"
    return str(n)


def cmd_convert(args) -> int:
    import herd
    from herd.checkpoint.load import check_new_folder

    check_new_folder(args.dst)  # before minutes of loading, not after
    llm = herd.load(args.src, dtype=args.dtype, quantize=args.quantize, quantize_group=args.quantize_group)
    out = llm.save_pretrained(args.dst)
    how = f"{args.dtype} weights" + (f", experts in {args.quantize} (compressed-tensors)" if args.quantize else "")
    print(f"herd: wrote Hugging Face checkpoint {out} ({how})", file=sys.stderr)
    return 0


def serve_threads(requested: int | None, ranks: int = 1) -> int:
    """torch's threads for `herd serve`'s engine: as asked, else every core this process may use but one
    (under --tp, each of the ``ranks`` processes on a host takes its share of them).

    The HTTP side (request parsing, one streamed chunk per token per client) needs a core of its
    own: when it shares one with a torch thread, every parallel product waits for the descheduled
    thread (docs/serving.md). The engine process is pinned to these cores and the HTTP side to the rest."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1) if ranks == 1 else max(1, cores // ranks)


def served_name(model: str, given: str | None) -> str:
    """The model id clients send: --served-model-name, else a preset's name or the folder's own name
    (resolved: `--model .` or `--model ckpt/` would otherwise serve '' )."""
    from pathlib import Path

    return given or (Path(model).resolve().name if Path(model).exists() else Path(model).name)


def cmd_serve(args) -> int:
    import socket

    import torch

    # What can be checked without the model is checked before minutes of loading.
    ranks = args.tp * args.pp
    threads = serve_threads(args.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ranks > 1 else 1)
    if args.allow_images_from is not None and not Path(args.allow_images_from).is_dir():
        raise ValueError(f"--allow-images-from {args.allow_images_from}: not a folder")
    if args.image_megapixels <= 0:
        raise ValueError(f"--image-megapixels must be > 0, got {args.image_megapixels}")
    if args.prefix_cache_gb < 0:
        raise ValueError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 listens
        try:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            with socket.create_server((args.host, args.port), family=family):
                pass
        except OSError as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); is another server "
                             "there? Choose another --port") from None
    # On a CPU the engine runs in a forked process (EngineProcess), and OpenMP's thread pool does
    # not survive a fork: load on one thread, and let the child and this process take `threads` after.
    # Under --tp the engine is a thread of rank 0 (a fork would leave the group behind).
    engine_process = torch.device(args.device).type == "cpu" and ranks == 1
    torch.set_num_threads(1 if engine_process else threads)
    return _run(args, lambda llm: _serve(llm, args, threads if engine_process else 0))


def _serve(llm, args, engine_process_threads: int) -> int:
    import torch
    import uvicorn

    from herd.serve.app import ServeOptions, create_app

    llm.prefix_cache_bytes = int(args.prefix_cache_gb * 2**30)
    key = args.api_key or os.environ.get("HERD_API_KEY") or None
    name = served_name(args.model, args.served_model_name)
    options = ServeOptions(name, key, args.max_batch, args.max_queue, args.max_context, args.max_body_mb << 20,
                           args.allow_images_from, args.metrics_key or os.environ.get("HERD_METRICS_KEY") or None,
                           args.image_megapixels, engine_process_threads=engine_process_threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"herd: WARNING: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    threads = engine_process_threads or torch.get_num_threads()
    tp = f", {args.tp} tensor-parallel x {args.pp} pipeline ranks" if args.tp * args.pp > 1 else ""
    print(f"herd: serving {name!r} on http://{args.host}:{args.port} (OpenAI API under /v1; "
          f"{threads} torch thread{'s' * (threads > 1)}{tp})", file=sys.stderr)
    if args.tp * args.pp == 1:
        uvicorn.run(create_app(llm, options), host=args.host, port=args.port, log_level=args.log_level)
        return 0
    # Under --tp the server stops once a rank is gone (the requests it had got an error), and on
    # SIGTERM within seconds (streams still open after 5 s are cut); then the caller releases the
    # other ranks or reports the one that is gone. uvicorn re-raises the signal it caught once it
    # is done: the handler it restores is this no-op, so the process lives on to do that.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(create_app(llm, options), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=5))
    options.on_engine_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 0


def cmd_train(args) -> int:
    from herd.train.config import describe_fields, load_config

    if args.fields:
        print(describe_fields())
        return 0
    if args.config is None and not args.set:
        raise ValueError("herd train needs a CONFIG file (or --set overrides); --fields lists every field")
    from herd.train.trainer import train

    cfg = load_config(args.config, args.set)
    out = train(cfg, stop_after=args.stop_after)
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"herd: training done; model in {out}", file=sys.stderr)
    return 0


def _add_speculate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", choices=["ngram"], default=None,
                   help="prompt-lookup decoding: draft tokens from the prompt, verify them in one forward "
                        "(same output; faster where replies repeat the prompt)")
    p.add_argument("--speculate-tokens", type=int, default=4, help="draft tokens per step (default 4)")


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", "--tensor-parallel-size", type=int, default=1, metavar="T",
                   help="split each layer over T processes (run under torchrun --nproc-per-node T x P; "
                        "docs/distributed.md)")
    p.add_argument("--pp", "--pipeline-parallel-size", type=int, default=1, metavar="P",
                   help="split the layers into P stages of T processes each")
    p.add_argument("--ep", "--enable-expert-parallel", action="store_true",
                   help="with --tp T: each process holds E/T whole routed experts instead of a slice of every one")


def _add_load_options(p: argparse.ArgumentParser) -> None:
    """The options `_load` reads: the same on every command that loads a model."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint folder, preset or embedded model (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="half precision on a CPU: compile batch-1 decode's output product (faster; ~20 s once)")
    _add_quantize_options(p)


def _add_quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="the KV cache's dtype (default auto: the fast float one for the device); int8 keeps "
                        "int8 values with a scale per token and KV head, half a bf16 cache")
    p.add_argument("--quantize", choices=["int8", "int4", "fp8"], default=None,
                   help="store the experts' weights in int8 (per channel), int4 (groups) or fp8 (per channel; CUDA "
                        "GPUs of compute capability 8.9+), quantized as they load")
    p.add_argument("--quantize-group", type=int, default=128, choices=[32, 64, 128, 256],
                   help="inputs per int4 scale (default 128)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="Llama 4 (Scout, Maverick, Behemoth) in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt (as a chat turn unless --raw)")
    g.add_argument("prompt")
    g.add_argument("--image", action="append", default=[], help="attach an image (repeatable)")
    g.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    c = sub.add_parser("chat", help="interactive chat with history (images with /image PATH)")
    c.add_argument("--system", default=None, help="a system prompt")
    for sp in (g, c):
        _add_load_options(sp)
        _add_parallel_options(sp)
        _add_speculate_options(sp)
        sp.add_argument("--max-new-tokens", type=int, default=256 if sp is c else 32)
        sp.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
        sp.add_argument("--top-k", type=int, default=0, help="0: off")
        sp.add_argument("--top-p", type=float, default=1.0)
        sp.add_argument("--min-p", type=float, default=0.0)
        sp.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming, tools)")
    _add_load_options(s)
    _add_parallel_options(s)
    _add_speculate_options(s)
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: folder name)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set HERD_API_KEY)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="sequences waiting beyond the batch; then 429")
    s.add_argument("--prefix-cache-gb", type=float, default=0.0,
                   help="keep the KV state of recent prompts, up to this many GB, and reuse it for prompts that "
                        "start the same way (a system prompt, earlier turns); 0: off")
    s.add_argument("--max-context", type=int, default=8192, help="tokens per sequence (prompt + reply)")
    s.add_argument("--max-body-mb", type=int, default=32, help="largest request body (413 beyond)")
    s.add_argument("--allow-images-from", default=None, metavar="DIR",
                   help="let file:// image URLs read images below DIR (off by default)")
    s.add_argument("--metrics-key", default=None,
                   help="key for GET /metrics (or set HERD_METRICS_KEY); without it /metrics takes the API key")
    s.add_argument("--image-megapixels", type=float, default=64.0, metavar="MP",
                   help="pixels decoded at once over all requests (a 49 MP image holds ~300 MB while decoded); "
                        "an image waits for room up to 10 s, then its request gets a 503")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the usable cores but one, which is left to the HTTP side)")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="pretrain, fine-tune (sft) or LoRA-tune a model from a TOML config "
                       "(several processes: torchrun --nproc-per-node N -m herd train CONFIG)")
    t.add_argument("config", nargs="?", help="the TOML file (see --fields)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    t.add_argument("--fields", action="store_true", help="print every config field with its default and meaning")
    t.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop (checkpointed) once this step is done; a later run resumes")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="config, parameter counts and memory of a checkpoint or preset (no weights read)")
    i.add_argument("model")
    i.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    i.add_argument("--device", default="cpu", help="where it would run (picks the KV cache's dtype)")
    i.add_argument("--context", type=int, default=8192, help="tokens of KV cache to plan for (default 8192)")
    _add_quantize_options(i)
    i.set_defaults(func=cmd_info)

    q = sub.add_parser("perplexity", help="perplexity on a text file; with --quantize or --kv-dtype and --compare, the "
                       "KL divergence and top-1 agreement against the model without them")
    _add_load_options(q)
    q.add_argument("--text", required=True, help="a UTF-8 text file")
    q.add_argument("--window", type=int, default=1024, help="tokens per scored window (default 1024)")
    q.add_argument("--compare", action="store_true",
                   help="also load the model unquantized with the default KV cache, and compare")
    q.add_argument("--reference", default=None, metavar="MODEL",
                   help="compare against this model instead (e.g. the bf16 original of a quantized checkpoint)")
    q.set_defaults(func=cmd_perplexity)

    c = sub.add_parser("convert", help="load any supported checkpoint and write it in Hugging Face format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default bfloat16, the dtype Llama 4 is released in, "
                        "whatever the source's)")
    _add_quantize_options(c)
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
