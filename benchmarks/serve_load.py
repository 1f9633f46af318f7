"""Load test of `herd serve` on loopback: concurrent streaming chats against the same requests one by one.

    python benchmarks/serve_load.py [--model herd-tiny] [--requests 32] [--concurrency 1 8 32]
                                    [--max-tokens 32] [--max-batch 32] [--rounds 3] [--json out.json]

Starts a real `herd serve` process on a free loopback port, then for each concurrency level sends
``--requests`` streaming chat completions (greedy, up to ``--max-tokens`` new tokens; tokens are
counted from each response's usage) through the official OpenAI client from that many threads
at once, after a warm-up of as many requests as the level runs at once (so every cache row it uses
has been touched before the clock starts). Reported per level: requests that failed (must be 0),
aggregate generated tokens/s, its ratio to concurrency 1 (sequential), and p50 / p99 time to first
token. Also reported: CPU seconds used by the server (its engine process included) and by this
client process in each level — on a
2-core machine the load generator's own work (the OpenAI client parsing every streamed chunk)
competes with the server. Bounded: every request has a timeout (``--timeout``).

The levels run ``--rounds`` times in turn (1, 8, 32, 1, 8, 32, ...) against the same server: a
shared 2-core machine drifts by tens of percent within minutes, so each round's ratio is taken
against that round's concurrency-1 figure, and the table shows the median round (every round's
ratio is printed under it).
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


def start_server(model: str, *options: str, log=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """`herd serve --model MODEL OPTIONS...` on a free loopback port, once it answers /health; its
    output goes to ``log`` (a file, or nowhere)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", model, "--port", str(port), *options],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
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
    """User + system CPU time of a process (this one when pid is None) and of its live child
    processes (the server's engine process), from /proc."""
    proc = Path(f"/proc/{pid or 'self'}")
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if pid is not None:
        for task in proc.glob("task/*/children"):
            total += sum(cpu_seconds(int(child)) for child in task.read_text().split())
    return total


def level(url: str, model: str, n: int, concurrency: int, max_tokens: int, timeout: float, server_pid: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:  # warm-up: as many rows as the level uses
        list(pool.map(lambda i: one_request(client, model, i, max_tokens), range(concurrency)))
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
    ap.add_argument("--rounds", type=int, default=3, help="times to run every level, in turn")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    proc, url = start_server(args.model, "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.requests)))
    rounds: list[list[dict]] = []
    try:
        for r in range(args.rounds):
            rounds.append([])
            for c in args.concurrency:
                print(f"round {r + 1}/{args.rounds}, concurrency {c}: {args.requests} streaming requests ...",
                      file=sys.stderr, flush=True)
                rounds[-1].append(level(url, args.model, args.requests, c, args.max_tokens, args.timeout, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for rnd in rounds:  # each round's ratios against its own sequential level
        base = next((b for b in rnd if b["concurrency"] == 1), None)
        for row in rnd:
            row["vs_sequential"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    rows = [median_round([rnd[i] for rnd in rounds]) for i in range(len(args.concurrency))]
    print(f"\nherd serve --model {args.model} --max-batch {args.max_batch}: {args.requests} streaming chat requests "
          f"of up to {args.max_tokens} tokens per level (loopback), median of {args.rounds} round(s)")
    print(f"{'concurrent':>10} {'errors':>6} {'tokens/s':>9} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'CPU s: server':>14} {'client':>7} {'wall':>6}")
    for r in rows:
        ratio = f"{r['vs_sequential']:5.2f}x" if r["vs_sequential"] else "   n/a"
        print(f"{r['concurrency']:10d} {r['errors']:6d} {r['tokens_per_s']:9.1f} {ratio} "
              f"{r['ttft_p50_s'] or float('nan'):8.3f}s {r['ttft_p99_s'] or float('nan'):8.3f}s "
              f"{r['server_cpu_s']:14.1f} {r['client_cpu_s']:7.1f} {r['wall_s']:6.1f}")
    for i, c in enumerate(args.concurrency):
        every = [rnd[i] for rnd in rounds]
        print(f"  concurrency {c}, every round: tokens/s " + ", ".join(f"{r['tokens_per_s']:.1f}" for r in every)
              + ("; vs 1: " + ", ".join(f"{r['vs_sequential']:.2f}x" for r in every) if every[0]["vs_sequential"] else ""))
        for e in (e for r in every for e in r["first_errors"]):
            print(f"    error: {e}")
    errors = sum(r["errors"] for rnd in rounds for r in rnd)
    if args.json:
        Path(args.json).write_text(json.dumps({"median": rows, "rounds": rounds}, indent=1))
    return 0 if errors == 0 else 1


def median_round(rows: list[dict]) -> dict:
    """Of one level's rounds, the one with the median ratio to sequential (then tokens/s: the
    sequential level itself, or runs without one); a failed request anywhere shows in its error count."""
    ordered = sorted(rows, key=lambda r: (r["vs_sequential"] or 0.0, r["tokens_per_s"]))
    return {**ordered[(len(ordered) - 1) // 2], "errors": sum(r["errors"] for r in rows)}


if __name__ == "__main__":
    sys.exit(main())
