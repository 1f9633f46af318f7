"""`herd chat` driven through a pseudo-terminal, as a person types into it."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # a real process on a terminal


class Chat:
    def __init__(self, *args: str):
        pid, fd = pty.fork()
        if pid == 0:  # the child: its terminal is the pty, so Ctrl-C is a SIGINT, as for a person
            os.execvpe(sys.executable, [sys.executable, "-m", "herd", "chat", *args],
                       {**os.environ, "TERM": "xterm", "PYTHONUNBUFFERED": "1"})
        self.pid, self.fd, self.out = pid, fd, b""

    def until(self, pattern: bytes, timeout: float = 60) -> bytes:
        """Read until ``pattern`` (a regex) appears after what was read before; return what came."""
        start, deadline = len(self.out), time.time() + timeout
        while not re.search(pattern, self.out[start:]):
            assert time.time() < deadline, f"no {pattern!r} in {self.out[start:][-2000:]!r}"
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    break
        return self.out[start:]

    def send(self, text: str) -> None:
        data = text.encode()
        for i in range(0, len(data), 1024):  # as a paste arrives: in pieces, not one write
            os.write(self.fd, data[i:i + 1024])

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # already gone and reaped
            pass
        os.close(self.fd)


@pytest.fixture
def chat():
    session = Chat("--model", "tiny-moe", "--max-new-tokens", "6")
    session.until(rb"you> ")
    yield session
    session.close()


def _prompt_tokens(text: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"prompt (\d+) tokens", text)]


def test_a_bad_image_path_is_refused_when_typed_and_breaks_nothing(chat):
    chat.send("/image /no/such/picture.png\r")
    said = chat.until(rb"you> ")
    assert b"file not found" in said and b"nothing attached" in said
    chat.send("hello\r")
    said = chat.until(rb"you> ")
    assert b"error" not in said and _prompt_tokens(said)  # answered
    chat.send("/image\r")
    assert b"/image needs a path" in chat.until(rb"you> ")
    chat.send("/frobnicate now\r")
    said = chat.until(rb"you> ")
    assert b"unknown command /frobnicate" in said and b"/reset" in said
    assert len(_prompt_tokens(chat.out)) == 1  # neither went to the model as text


def test_ctrl_c_stops_a_reply_and_keeps_the_conversation():
    session = Chat("--model", "tiny-moe", "--max-new-tokens", "3000")
    try:
        session.until(rb"you> ")
        session.send("tell me everything\r")
        session.until(rb"herd> ")
        session.until(rb"\S{3}")  # the reply is coming
        time.sleep(0.3)
        session.send("\x03")
        said = session.until(rb"you> ")
        assert b"(stopped)" in said and b"Traceback" not in said
        session.send("and then?\r")
        said = session.until(rb"herd> ")
        session.send("\x03")
        session.until(rb"you> ")
        session.send("/quit\r")
        assert os.waitpid(session.pid, 0)[1] == 0  # it left by /quit, not by the Ctrl-Cs
    finally:
        session.close()


def test_line_editing_long_pastes_and_blocks_of_lines(chat):
    chat.send("helo\x1b[Dl\r")  # left arrow, then the missing letter
    said = chat.until(rb"you> ")
    assert b"^[[D" not in said and _prompt_tokens(said)
    chat.send("/reset\r")
    chat.until(rb"you> ")
    chat.send("word " * 1200 + "\r")  # 6,000 characters on one line: over a raw terminal's 4,095
    long = _prompt_tokens(chat.until(rb"you> ", timeout=120))
    assert long and long[0] > 1150 and b"warning" not in chat.out
    chat.send("/reset\r")
    chat.until(rb"you> ")
    chat.send('"""\rfirst line\rsecond line\rthird line\r"""\r')
    said = chat.until(rb"you> ")
    assert len(_prompt_tokens(said)) == 1  # one message, not three
