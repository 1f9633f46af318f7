"""The long fuzz run of `herd serve`: mutated request bodies (tests/fuzz.py) against a real server.

    python benchmarks/fuzz_server.py [--model tiny-moe] [--requests 20000] [--seed 0] [--threads 4]

Starts `herd serve --api-key ... --max-context 256` on a free loopback port, sends the requests,
checks every 2,000 that a normal request is still answered, and at the end that the server's log
holds no traceback. Prints the statuses seen and every problem (status >= 500, an error not in
OpenAI's shape, a stream ending in an error event) with the seed and index that make it again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402
from tests.fuzz import hammer  # noqa: E402

KEY = "fuzz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server, url = start_server(args.model, "--api-key", KEY, "--max-context", "256", "--allow-images-from",
                               tempfile.gettempdir(), log=log)
    try:
        normal = json.dumps({"model": args.model, "max_tokens": 2,
                             "messages": [{"role": "user", "content": "Hi"}]}).encode()

        def still_answers() -> None:
            req = urllib.request.Request(url + "/v1/chat/completions", data=normal, method="POST", headers={
                "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert json.loads(r.read())["choices"], "a normal request got no choices"

        start, sent, problems, statuses = time.time(), 0, [], {}
        for block in range(0, args.requests, 2000):
            n, p, st = hammer(url, KEY, args.model, min(2000, args.requests - block), seed=args.seed + block,
                              threads=args.threads)
            sent, problems = sent + n, problems + [(args.seed + block, *x) for x in p]
            for k, v in st.items():
                statuses[k] = statuses.get(k, 0) + v
            still_answers()
            print(f"{sent} requests in {time.time() - start:.0f} s, {len(problems)} problems, "
                  f"statuses {dict(sorted(statuses.items()))}", flush=True)
        log.seek(0)
        text = log.read()
        tracebacks = text.count("Traceback")
        print(f"\n{sent} requests, {time.time() - start:.0f} s; statuses {dict(sorted(statuses.items()))}; "
              f"problems {len(problems)}; tracebacks in the server log {tracebacks}; server alive "
              f"{server.poll() is None}")
        for seed, i, what, path, body in problems[:30]:
            print(f"  seed {seed} #{i} {path}: {what}: {body[:160]!r}")
        if tracebacks:
            print(text[text.index("Traceback"):][:3000])
        return 1 if problems or tracebacks or server.poll() is not None else 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
