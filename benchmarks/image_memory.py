"""Memory of `herd serve`'s HTTP process under concurrent huge images.

    python benchmarks/image_memory.py [--model tiny-moe] [--requests 8] [--side 7000] [--megapixels 64]

Starts a real `herd serve` on a free loopback port, sends ``--requests`` chat requests at once, each
with one ``--side`` x ``--side`` PNG (7000: 49 megapixels, under the 50-megapixel limit, a ~150 KB
file), and samples the HTTP process's resident memory (VmRSS; the engine runs in a child process
and is not counted) every 10 ms. Reported: idle RSS before, peak growth over it while the requests
run, and what is still held 5 s after the last reply, with how many requests got 200 / 503.
``--megapixels`` is the server's `--image-megapixels` budget (pixels decoded at once).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path (tests/test_serve.py)
from serve_load import start_server  # noqa: E402

KEY = "bench"


def big_png(side: int) -> str:
    """A side x side RGB PNG with a few coloured bands: it compresses to well under a megabyte."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for i, color in enumerate([(200, 30, 30), (30, 160, 60), (40, 60, 200)]):
        draw.rectangle((side * i // 4, side // 5, side * (i + 1) // 4, side * 4 // 5), fill=color)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(model: str, requests: int, side: int, megapixels: float, log=sys.stderr) -> dict:
    server, url = start_server(model, "--api-key", KEY, "--max-context", "4096", "--image-megapixels", str(megapixels))
    try:
        image = big_png(side)
        body = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}]}).encode()

        def send(_) -> int:
            req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        send(0)  # warm-up: the first image request loads code and allocates the encoder's buffers
        time.sleep(1.0)
        idle = rss_mb(server.pid)
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(server.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.time()
        print(f"sending {requests} requests with a {side}x{side} PNG ({len(image) // 1024} KB as a data URL)",
              file=log, flush=True)
        with concurrent.futures.ThreadPoolExecutor(requests) as pool:
            statuses = list(pool.map(send, range(requests)))
        took = time.time() - start
        time.sleep(5.0)
        done.set()
        sampler.join()
        return {"idle_mb": idle, "peak_growth_mb": peak - idle, "after_mb": rss_mb(server.pid) - idle,
                "statuses": {s: statuses.count(s) for s in sorted(set(statuses))}, "seconds": took}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--side", type=int, default=7000)
    ap.add_argument("--megapixels", type=float, default=64.0)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    r = measure(args.model, args.requests, args.side, args.megapixels)
    print(f"| requests | image | budget | idle RSS | peak growth | held 5 s after | statuses | time |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {args.requests} | {args.side}x{args.side} | {args.megapixels:g} MP | {r['idle_mb']:.0f} MB | "
          f"{r['peak_growth_mb']:.0f} MB | {r['after_mb']:.0f} MB | {r['statuses']} | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
