"""Every fenced code block of README.md and docs/*.md runs as written, on the default model.

Python blocks of one page run in order in one interpreter (a later block uses what an earlier one
made), shell blocks each in bash, TOML blocks through herd's config checker; all in a scratch
folder holding a copy of examples/. A block preceded by ``<!-- not run: REASON -->`` is skipped
for that reason; ``<!-- run with: herd serve -->`` runs it with `herd serve` listening on port 8000.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes: the examples load models, generate, serve

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- (?P<mark>[^>]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```$", re.S | re.M)
RUN = {"python", "bash", "toml"}


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """(line, language, code, mark) of each fenced block."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m["lang"], m["code"], m["mark"] or "")
            for m in FENCE.finditer(text)]


@pytest.fixture
def scratch(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    return tmp_path


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_block_is_run_or_says_why_not():
    for page in PAGES:
        for line, lang, _, mark in blocks(page):
            where = f"{_page_id(page)}:{line}"
            assert lang in RUN or lang in ("", "text"), f"{where}: a ```{lang} block this test cannot run"
            assert mark in ("", "run with: herd serve") or re.fullmatch(r"not run: \S.*", mark), \
                f"{where}: unknown mark {mark!r}"
    assert sum(lang == "python" for _, lang, _, _ in blocks(ROOT / "README.md")) >= 4


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_blocks_run_as_written(page, scratch):
    todo = [(line, code, mark) for line, lang, code, mark in blocks(page)
            if lang == "python" and not mark.startswith("not run")]
    if not todo:
        return
    script = "ns = {}\n" + "".join(
        f"print('--- {page.name}:{line}', flush=True)\nexec(compile({code!r}, '{page.name}:{line}', 'exec'), ns)\n"
        for line, code, _ in todo)
    server = _serve() if any(mark == "run with: herd serve" for _, _, mark in todo) else None
    try:
        run = subprocess.run([sys.executable, "-c", script], cwd=scratch, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count("--- ") == len(todo)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_shell_blocks_run_as_written(page, scratch):
    for line, lang, code, mark in blocks(page):
        if lang != "bash" or mark.startswith("not run"):
            continue
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=scratch, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        assert run.returncode == 0, f"{_page_id(page)}:{line}: {run.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_toml_blocks_are_valid_configs(page, scratch):
    from herd.train.config import load_config

    for line, lang, code, _ in blocks(page):
        if lang == "toml":
            (scratch / "block.toml").write_text(code)
            load_config(scratch / "block.toml")  # raises, naming the field, on anything herd train refuses


def test_the_demo_prints_what_the_readme_says():
    run = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "A green circle and a yellow square." in run.stdout
    assert "prints `A green circle and a yellow square.`" in (ROOT / "README.md").read_text()


def _serve() -> subprocess.Popen:
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 8000)) != 0, "port 8000 is taken: the README's server example needs it"
    server = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--port", "8000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1).read()
            return server
        except OSError:
            assert time.time() < deadline and server.poll() is None, "herd serve did not start"
            time.sleep(0.3)
