"""Mutated requests for `herd serve`: seeded, so a failing body can be made again from its seed.

`bodies(seed)` yields (method, path, body bytes) forever: valid chat / completions / models requests
with one to three mutations each (types swapped, numbers at float and integer extremes, deep
nesting, huge strings, unknown fields, broken base64, odd Unicode, dropped fields, truncated JSON).
`hammer(url, ...)` sends them and returns every answer that breaks the server's contract: a status
of 500 or more, an error that is not OpenAI-shaped, a stream that ends in an error event.
Used by tests/test_serve.py (a bounded slice) and benchmarks/fuzz_server.py (the long run).
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import http.client
import io
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

_EXTREMES: list[Any] = [0, -1, 1, 2**31, 2**63 - 1, 2**63, -2**63 - 1, 2**64, 10**30, -10**30, 1e308, -1e308,
                        5e-324, 1e-300, -0.0, 0.5, 1.5, 2.000001, 3.0, True, False, None]
# Literal JSON text that json.dumps cannot make: non-standard constants, 5,000-digit numbers, deep nesting.
_RAW_VALUES = ["NaN", "Infinity", "-Infinity", "9" * 5000, "-" + "1" * 4400, "1e99999", "1" + "0" * 400 + ".5",
               "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000]
_STRINGS = ["", " ", "\x00", "\ud800", "\udfff", "\u202e\u200b", "🦙" * 50, "é" * 3 + "\u0301" * 20, "\ufffe",
            "<|eot|>", "<|image|><|patch|>", "<|python_start|>", "[get_weather(city=", "{\"a\":",
            "data:image/png;base64,%%%", "data:image/png;base64,iVBORw0KGgo=", "file:///etc/passwd",
            "file:///tmp/\x00x.png", "file:///" + "n" * 300, "http://127.0.0.1:1/x.png", "auto", "none",
            "required", "function", "assistant", "system", "tool", "developer", "ipython", "user"]
_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
         "min_p", "n", "stream", "stream_options", "stop", "seed", "logprobs", "top_logprobs", "tools", "tool_choice",
         "response_format", "presence_penalty", "frequency_penalty", "logit_bias", "user", "echo", "suffix",
         "parallel_tool_calls", "x-unknown", "__proto__", "constructor"]
_PATHS = ["/v1/chat/completions", "/v1/completions"]
# Error events a stream may end with that are not server faults (docs/serving.md): a forced tool call
# the model did not write.
STREAM_REFUSALS = {"tool_call_not_parsed"}


def _png(rng: random.Random) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (rng.randint(1, 80), rng.randint(1, 80)), (rng.randrange(256), 30, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    if rng.random() < 0.3:  # truncated or corrupted image data
        cut = rng.randrange(len(data))
        data = data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _seed_body(rng: random.Random, model: str) -> tuple[str, dict]:
    """A valid request (short replies) to mutate."""
    if rng.random() < 0.25:
        return "/v1/completions", {"model": model, "prompt": rng.choice(["Once upon a time", [1, 2, 3]]),
                                   "max_tokens": rng.randint(1, 4), "stream": rng.random() < 0.5}
    content: Any = "Hello there"
    if rng.random() < 0.3:
        content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": _png(rng)}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    if rng.random() < 0.3:
        messages += [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": rng.randint(1, 4)}
    if rng.random() < 0.4:
        body["tools"] = [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}]
        body["tool_choice"] = rng.choice(["auto", "none", "required",
                                          {"type": "function", "function": {"name": "get_weather"}}])
    for key, value in (("stream", True), ("n", 2), ("logprobs", True), ("temperature", 0.7), ("seed", 7),
                       ("stop", ["\n"]), ("top_p", 0.9)):
        if rng.random() < 0.2:
            body[key] = value
    if body.get("logprobs") and rng.random() < 0.5:
        body["top_logprobs"] = 2
    return "/v1/chat/completions", body


def _nest(value: Any, depth: int, rng: random.Random) -> Any:
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def _random_value(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.3:
        return rng.choice(_EXTREMES)
    if r < 0.55:
        return rng.choice(_STRINGS)
    if r < 0.65:
        return "x" * rng.choice([1000, 100_000, 1_000_000])
    if r < 0.75:
        return _nest(rng.choice([1, "x", None]), rng.choice([2, 50, 400]), rng)
    if r < 0.85:
        return [rng.choice(_EXTREMES) for _ in range(rng.randint(0, 5))]
    return {rng.choice(_KEYS): rng.choice(_EXTREMES + _STRINGS) for _ in range(rng.randint(0, 3))}


def _places(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside ``value`` (the root excluded)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,)
            yield from _places(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield path + (i,)
            yield from _places(v, path + (i,))


def _mutate(body: dict, rng: random.Random) -> None:
    places = list(_places(body))
    kind = rng.random()
    if kind < 0.15 or not places:  # an unknown or known field, added at the top
        body[rng.choice(_KEYS)] = _random_value(rng)
        return
    path = rng.choice(places)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if kind < 0.25:  # dropped
        del parent[last]
    elif kind < 0.35 and isinstance(parent, list):  # duplicated many times
        parent.extend([copy.deepcopy(parent[last])] * rng.choice([2, 20, 1100]))
    else:
        parent[last] = _random_value(rng)


def bodies(seed: int, model: str) -> Iterator[tuple[str, str, bytes]]:
    rng = random.Random(seed)
    while True:
        r = rng.random()
        if r < 0.03:
            yield "GET", rng.choice(["/v1/models", f"/v1/models/{model}", "/v1/models/x%00y", "/metrics"]), b""
            continue
        path, body = _seed_body(rng, model)
        if r < 0.08:
            path = rng.choice(_PATHS)  # a chat body on completions and the other way round
        for _ in range(rng.randint(1, 3)):
            _mutate(body, rng)
        try:
            text = json.dumps(body).encode()
        except RecursionError:  # nested past what json.dumps writes: send it as it was before the mutations
            continue
        if rng.random() < 0.1:  # a value json.dumps cannot write
            text = text.replace(b'"max_tokens": ', b'"max_tokens": ' + rng.choice(_RAW_VALUES).encode() + b", \"_\": ", 1)
        if rng.random() < 0.04:  # truncated, or with a stray byte
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + rng.choice([b"", b"\xff", b"\x00", b"}"])
        yield "POST", path, text


def _problem(status: int, data: bytes, stream: bool) -> str | None:
    if status >= 500 or status == 0:
        return f"status {status}" if status else f"no complete answer: {data[:100]!r}"
    if status >= 400:
        try:
            error = json.loads(data)["error"]
            assert isinstance(error["message"], str) and error["message"] and "type" in error
        except Exception:
            return f"status {status} without an OpenAI-shaped error"
        return None
    if stream:
        for line in data.split(b"\n\n"):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:  # only the documented refusals may end a stream
                    return None if event["error"].get("code") in STREAM_REFUSALS else \
                        f"a stream that ended in an error event: {event['error']}"
        if not data.rstrip().endswith(b"data: [DONE]"):
            return "a stream without [DONE]"
    return None


def hammer(url: str, key: str, model: str, count: int, seed: int = 0, seconds: float = 1e9, threads: int = 4,
           progress: Any = None, body_limit: int = 32 << 20) -> tuple[int, list[tuple[int, str, str, bytes]], dict[int, int]]:
    """Send up to ``count`` mutated requests (stops after ``seconds``); return (sent, problems, statuses),
    each problem as (index, what, path, the first 300 bytes of its body). A body over 4x the server's
    ``body_limit`` is refused before it is read, so its client may see a reset instead of the 413."""
    sent, problems, statuses = 0, [], {}
    deadline = time.time() + seconds

    def one(item: tuple[int, tuple[str, str, bytes]]) -> None:
        nonlocal sent
        i, (method, path, body) = item
        if time.time() > deadline:
            return
        req = urllib.request.Request(url + path, data=body if method == "POST" else None, method=method, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        except (OSError, http.client.HTTPException) as e:  # a reset, a stream cut short
            status, data = 0, repr(e).encode()
            if len(body) > 4 * body_limit:  # refused unread while the client was still sending: expected
                status, data = 413, b'{"error": {"message": "reset while sending", "type": "-"}}'
        sent += 1
        statuses[status] = statuses.get(status, 0) + 1
        what = _problem(status, data, b'"stream": true' in body and status == 200 and path in _PATHS)
        if what:
            problems.append((i, what, path, body[:300]))
        if progress is not None and sent % 500 == 0:
            progress(f"{sent} requests, {len(problems)} problems, statuses {dict(sorted(statuses.items()))}")

    gen = bodies(seed, model)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, count, 8 * threads):  # a few at a time: bodies can be megabytes
            if time.time() > deadline:
                break
            list(pool.map(one, ((i, next(gen)) for i in range(start, min(count, start + 8 * threads)))))
    return sent, problems, statuses
