"""The ``--generator module:function`` plug-in API of the workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PLUGIN = """
import asyncio

from ringcast.server.plugin import JobContext


async def generate(ctx: JobContext):
    words = ctx.prompt_text().split()
    if words == ["explode"]:
        yield "partial"
        raise RuntimeError("the model fell over")
    for w in words:
        yield w.upper() + " "
        await asyncio.sleep(0)
    yield b'data: {"custom": true}\\n\\n'
    ctx.finish_reason = "stop"
"""


def test_plugin_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve, sse_events, data_of, error_of, check_ids
) -> None:
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with serve("--generator", "my_plugin:generate") as s:
        body = s.post_chat("p-1", prompt="hello plug in").read_all_and_close()
        check_ids(body)
        events = [data_of(e) for e in sse_events(body)]
        chunks = [json.loads(d) for d in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[1:-2])
        assert text == "HELLO PLUG IN "
        assert chunks[-2] == {"custom": True}  # bytes are appended as they are
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        assert events[-1] == b"[DONE]"
        # An exception ends the stream with an error event, state failed.
        body = s.post_chat("p-2", prompt="explode").read_all_and_close()
        err = error_of(sse_events(body)[-1])
        assert err["type"] == "server_error"
        assert "the model fell over" in str(err["message"])
        _, _, info = s.request("POST", "/v1/streams/lookup", {"conversation_ids": ["p-2"]})
        assert json.loads(info)[0]["state"] == "failed"
