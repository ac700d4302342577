"""The README's commands, run as written (the port aside): what a new user does first."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line, comments=True))
    return out


@pytest.fixture
def try_it() -> tuple[list[str], list[list[str]]]:
    serve_block, client_block = code_blocks(section(README, "Try it"), "bash")[:2]
    (serve,) = commands(serve_block)
    return serve, commands(client_block)


@pytest.fixture
def server(tmp_path: Path, try_it: tuple[list[str], list[list[str]]]) -> Iterator[str]:
    serve, _ = try_it
    assert serve[:2] == ["ringcast", "serve"]
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "ringcast.cli", *serve[1:], "--port", "0"),
            *("--http-procs", "1", "--segment", str(tmp_path / "seg")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := re.search(r"listening on http://([\w.\-:]+)", line):
                yield m.group(1)
                break
        else:
            raise AssertionError("ringcast serve did not start")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _at(cmd: list[str], address: str) -> list[str]:
    return [a.replace("localhost:8080", address) for a in cmd]


def _read_then_interrupt(cmd: list[str], n: int) -> bytes:
    """Run a streaming curl, take ``n`` bytes of its output, then interrupt it (the ^C)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    got = b""
    while len(got) < n and (data := proc.stdout.read1(65536)):
        got += data
    proc.terminate()
    proc.communicate(timeout=10)
    return got


def test_try_it_streams_long_enough_to_interrupt_by_hand(
    try_it: tuple[list[str], list[list[str]]],
) -> None:
    serve, client = try_it
    pace = float(serve[serve.index("--tokens-per-s") + 1])
    body = json.loads(client[0][client[0].index("-d") + 1])
    assert body["max_tokens"] / pace >= 20  # seconds of stream: time to read it and press ^C


def test_try_it_commands_work_as_written(
    server: str, try_it: tuple[list[str], list[list[str]]]
) -> None:
    _, client = try_it
    post, resume, lookup, delete = (_at(c, server) for c in client)
    assert post[0] == "curl"
    first = _read_then_interrupt(post, 600)
    assert first.startswith(b"id: ") and b"chat.completion.chunk" in first
    # Resumed from 0: the same bytes first, from a new connection.
    again = _read_then_interrupt(resume, len(first))
    assert again[: len(first)] == first
    found = json.loads(subprocess.run(lookup, capture_output=True, timeout=30).stdout)
    assert [s["conversation_id"] for s in found] == ["conv-1"]
    assert found[0]["is_done"] is False  # still generating after both clients left
    gone = subprocess.run([*delete, "-s", "-w", "%{http_code}"], capture_output=True, timeout=30)
    assert gone.stdout == b"204"
    found = json.loads(subprocess.run(lookup, capture_output=True, timeout=30).stdout)
    assert found == []
