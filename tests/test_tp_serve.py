"""`herd serve` and `herd chat` under torchrun with --tp 2: the same answers as one process, only rank 0
listens, and a rank that dies or a SIGTERM ends the group promptly with a clear word."""

from __future__ import annotations

import concurrent.futures
import glob
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import test_serve
from tests.test_serve import KEY, ROOT, TOOLS, Server, _png

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

script = test_serve.script  # the fixture: a checkpoint whose reply is a tool call
MODEL = "herd-tiny"  # trained: its logits are decisive, so rounding between 1 and 2 ranks picks the same tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same model served by one process and by two tensor-parallel ranks."""
    tmp = tmp_path_factory.mktemp("tp-serve")
    one = Server(MODEL, tmp, "--max-batch", "4")
    try:
        two = Server(MODEL, tmp, "--max-batch", "4", "--tp", "2", nproc=2)
    except BaseException:
        one.stop()
        raise
    yield one, two
    one.stop()
    two.stop()


def _ask(server: Server, stream: bool, model: str = MODEL, **fields):
    """The reply's text, its tool calls (name, arguments) and its finish reason."""
    args = {"max_tokens": 32, "temperature": 0, **fields, "model": model}
    c = server.client()
    if not stream:
        choice = c.chat.completions.create(**args).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    text, calls, finish = "", [], None
    for chunk in c.chat.completions.create(**args, stream=True):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            calls += [(t.function.name, t.function.arguments) for t in ch.delta.tool_calls or []]
            finish = ch.finish_reason or finish
    return text or None, calls, finish


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of a torchrun worker of ``launcher`` by its RANK."""
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in env:
            return int(d.rsplit("/", 1)[1])
    raise LookupError(f"no rank {rank} under pid {launcher}")


def _listening_pids(port: int) -> set[int]:
    """Processes holding a socket that listens on ``port`` (from /proc/net/tcp: state 0A is LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids = set()
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            pids.add(int(fd.split("/")[2]))
    return pids


@pytest.mark.parametrize("stream", [False, True])
def test_replies_equal_one_process_streamed_or_not(pair, stream):
    one, two = pair
    asks = [dict(messages=[{"role": "user", "content": "Tell me a story about a fox."}]),
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                                        {"type": "text", "text": "What color is the square?"}]}]),
            dict(messages=[{"role": "user", "content": "Tell me a story."}], temperature=0.9, top_p=0.95, seed=7),
            dict(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=TOOLS)]
    for fields in asks:
        assert _ask(two, stream, **fields) == _ask(one, stream, **fields)
    completion = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, logprobs=2)
    a, b = (s.client().completions.create(**completion).choices[0] for s in pair)
    assert b.text == a.text and b.logprobs.tokens == a.logprobs.tokens
    assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)


def test_staggered_mixed_streams_and_a_cancel_give_one_process_tokens(pair):
    """Continuous batching: requests of mixed lengths arrive while others run, one client leaves mid-stream."""
    prompts = ["Tell me a story about a fox.", "Hi", "Tell me about cows and what they eat in the morning.",
               "Describe a red circle.", "Tell me a story."]

    def run(server: Server) -> list[str]:
        def one(i: int) -> str:
            time.sleep(0.15 * i)  # arrivals while the first ones decode
            if i == 2:  # this client leaves after a few tokens: its rows free at the next step
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                body = {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": 200,
                        "temperature": 0, "stream": True}
                conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                             headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
                resp, seen = conn.getresponse(), b""
                while seen.count(b"data: ") < 4:
                    seen += resp.read1(4096)
                conn.close()
                return "(cancelled)"
            return _ask(server, True, messages=[{"role": "user", "content": prompts[i]}],
                        max_tokens=8 + 12 * (i % 3))[0]

        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(one, range(len(prompts))))

    one, two = pair
    assert run(two) == run(one)


def test_pipeline_stages_serve_one_process_replies(pair, tmp_path):
    """With a prefix cache too: the second time round every prompt resumes from its first time's."""
    import urllib.request

    one, _ = pair
    stages = Server(MODEL, tmp_path, "--max-batch", "4", "--pp", "2", "--prefix-cache-gb", "0.05", nproc=2)
    try:
        image = [{"type": "image_url", "image_url": {"url": _png((20, 20, 220))}},
                 {"type": "text", "text": "What color is the square?"}]
        for stream in (False, True):
            for content in ("Tell me a story about a fox.", image):
                fields = {"messages": [{"role": "user", "content": content}]}
                assert _ask(stages, stream, **fields) == _ask(one, stream, **fields)
        req = urllib.request.Request(stages.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        metrics = dict(line.rsplit(" ", 1) for line in urllib.request.urlopen(req).read().decode().splitlines()
                       if line and not line.startswith("#"))
        assert float(metrics["herd_prefix_cache_hits_total"]) >= 2
    finally:
        stages.stop()


def test_only_rank_0_listens(pair):
    _, two = pair
    assert _listening_pids(two.port) == {_rank_pid(two.proc.pid, 0)}


def test_tool_calls_under_tensor_parallelism(tmp_path, script):
    """The scripted checkpoint's tool call (tests/test_serve.py) through two ranks."""
    two = Server(str(script.folder), tmp_path, "--served-model-name", "scripted", "--tp", "2", nproc=2)
    try:
        messages = [{"role": "user", "content": "What's the weather in Paris?"}]
        for stream in (False, True):
            for server in (script, two):
                reply = _ask(server, stream, "scripted", messages=messages, tools=TOOLS, max_tokens=30)
                assert reply == (None, [("get_weather", json.dumps({"city": "Paris"}))], "tool_calls")
    finally:
        two.stop()


def _generating(server: Server):
    """A long streamed request, once its first tokens came: (response, what it sent so far)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 900, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp, seen = conn.getresponse(), b""
    while seen.count(b"data: ") < 4:  # the role chunk, then tokens: it is generating
        seen += resp.read1(4096)
    return resp, seen


def test_a_follower_that_dies_fails_the_open_stream_and_ends_the_group(tmp_path):
    server = Server(MODEL, tmp_path, "--tp", "2", nproc=2)
    try:
        resp, seen = _generating(server)
        follower = _rank_pid(server.proc.pid, 1)
        os.kill(follower, signal.SIGKILL)
        killed = time.monotonic()
        while b'"error"' not in seen or not seen.endswith(b"\n\n"):
            chunk = resp.read1(4096)
            assert chunk, seen[-500:]
            seen += chunk
        assert f"rank 1 (pid {follower}) exited".encode() in seen and b"[DONE]" not in seen
        server.proc.wait(timeout=30)
        assert time.monotonic() - killed < 30
        out = server.output()
        assert f"herd: error: the tensor-parallel group failed: rank 1 (pid {follower}) exited" in out
    finally:
        server.stop()


def test_sigterm_to_rank_0_ends_every_rank_soon(tmp_path):
    server = Server(MODEL, tmp_path, "--tp", "2", nproc=2)
    try:
        resp, _ = _generating(server)  # open while the server stops
        ranks = [_rank_pid(server.proc.pid, r) for r in (0, 1)]
        os.kill(ranks[0], signal.SIGTERM)
        start = time.monotonic()
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 10
        assert not any(os.path.exists(f"/proc/{pid}") for pid in ranks)
        resp.close()
    finally:
        server.stop()


def test_chat_under_torchrun_answers_as_one_process():
    typed = "Tell me a story about a fox.\nHow many legs does it have?\n/quit\n"

    def chat(*launch: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *launch, "-m", "herd", "chat", "--max-new-tokens", "24",
                               *(["--tp", "2"] if launch else [])], input=typed, capture_output=True, text=True,
                              cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})

    one = chat()
    two = chat("-m", "torch.distributed.run", "--nproc-per-node", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.count("herd>") == 2
