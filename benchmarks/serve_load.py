"""Load test of `herd serve` on loopback: concurrent streaming chats against the same requests one by one.

    python benchmarks/serve_load.py [--model herd-tiny] [--requests 32] [--concurrency 1 8 32]
                                    [--max-tokens 32] [--max-batch 32] [--json out.json]

Starts a real `herd serve` process on a free loopback port, then for each concurrency level sends
``--requests`` streaming chat completions (greedy, up to ``--max-tokens`` new tokens; tokens are
counted from each response's usage) through the official OpenAI client from that many threads
at once. Reported per level: requests that failed (must be 0), aggregate
generated tokens/s, its ratio to concurrency 1 (sequential), and p50 / p99 time to first token.
Also reported: CPU seconds used by the server and by this client process in each level — on a
2-core machine the load generator's own work (the OpenAI client parsing every streamed chunk)
competes with the server. Bounded: every request has a timeout (``--timeout``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("Mia", "Leo", "Anna", "Hugo", "Ivy", "Ben", "Kate", "Finn")  # "Tell me a story about ...": long replies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(queue)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("herd serve exited at start")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("herd serve did not start")


def one_request(client, model: str, i: int, max_tokens: int) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streaming chat."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me a story about {NAMES[i % len(NAMES)]}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else time.perf_counter() - start), tokens


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one when pid is None), from /proc."""
    fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def level(url: str, model: str, n: int, concurrency: int, max_tokens: int, timeout: float, server_pid: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    one_request(client, model, -1, 4)  # warm-up
    cpu_server, cpu_client = cpu_seconds(server_pid), cpu_seconds()
    start = time.perf_counter()
    ttft, tokens, errors = [], 0, []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one_request, client, model, i, max_tokens) for i in range(n)]
        for f in concurrent.futures.as_completed(futures):
            try:
                t, k = f.result()
                ttft.append(t)
                tokens += k
            except Exception as e:  # counted, reported
                errors.append(f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - start
    cpu_server, cpu_client = cpu_seconds(server_pid) - cpu_server, cpu_seconds() - cpu_client
    ttft.sort()
    return {"concurrency": concurrency, "requests": n, "errors": len(errors), "first_errors": errors[:3],
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "server_cpu_s": cpu_server, "client_cpu_s": cpu_client,
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="herd-tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    proc, url = start_server(args.model, args.max_batch, max(64, args.requests))
    rows = []
    try:
        for c in args.concurrency:
            print(f"concurrency {c}: {args.requests} streaming requests ...", file=sys.stderr, flush=True)
            rows.append(level(url, args.model, args.requests, c, args.max_tokens, args.timeout, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = rows[0]["tokens_per_s"] if rows and rows[0]["concurrency"] == 1 else None
    print(f"\nherd serve --model {args.model} --max-batch {args.max_batch}: {args.requests} streaming chat requests "
          f"of up to {args.max_tokens} tokens per level (loopback)")
    print(f"{'concurrent':>10} {'errors':>6} {'tokens/s':>9} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'CPU s: server':>14} {'client':>7} {'wall':>6}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:5.2f}x" if base else "   n/a"
        print(f"{r['concurrency']:10d} {r['errors']:6d} {r['tokens_per_s']:9.1f} {ratio} "
              f"{r['ttft_p50_s'] or float('nan'):8.3f}s {r['ttft_p99_s'] or float('nan'):8.3f}s "
              f"{r['server_cpu_s']:14.1f} {r['client_cpu_s']:7.1f} {r['wall_s']:6.1f}")
        for e in r["first_errors"]:
            print(f"    error: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
