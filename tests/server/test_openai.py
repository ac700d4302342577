"""The official ``openai`` SDK against a real ``ringcast serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, serve_module) -> Iterator[Any]:
    with serve_module("--tokens-per-s", "0", "--api-key", "sk-test") as s:
        yield s


_clients: list[openai.OpenAI] = []


def client(srv: Any, key: str = "sk-test") -> openai.OpenAI:
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    _clients.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def test_chat_streaming_matches_non_streaming(srv: Any) -> None:
    c = client(srv)
    msgs = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    stream = c.chat.completions.create(model="m", messages=msgs, max_tokens=12, stream=True)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12
    whole = c.chat.completions.create(model="m", messages=msgs, max_tokens=12)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    # The synthetic model is deterministic in the prompt.
    assert whole.choices[0].message.content == "".join(pieces)
    assert whole.usage is not None and whole.usage.completion_tokens == 12


def test_chat_streaming_with_conversation_id_is_replayable(srv: Any) -> None:
    c = client(srv)
    stream = c.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        stream=True,
        extra_headers={"X-Conversation-Id": "conv-1::ggml-org/tinygemma3-GGUF:Q8_0"},
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert len(text.split()) == 5
    status, _, body = srv.request(
        "GET",
        "/v1/stream?conv_id=conv-1%3A%3Aggml-org%2Ftinygemma3-GGUF%3AQ8_0",
        headers={"Authorization": "Bearer sk-test"},
    )
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")


def test_completions_streaming_and_not(srv: Any) -> None:
    c = client(srv)
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="m", prompt="Once upon a time", max_tokens=7, stream=True
        )
        if ch.choices
    )
    whole = c.completions.create(model="m", prompt="Once upon a time", max_tokens=7)
    assert whole.choices[0].text == text
    assert whole.choices[0].finish_reason == "length"


def test_models_and_bad_key(srv: Any) -> None:
    assert [m.id for m in client(srv).models.list()] == ["ringcast-synthetic"]
    with pytest.raises(openai.AuthenticationError):
        client(srv, "wrong").models.list()


def test_cancelled_stream_raises_api_error(tmp_path: Path, serve) -> None:
    with serve("--tokens-per-s", "20", "--prefill-s", "0") as s:
        c = client(s, "none")
        stream = c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=1000,
            stream=True,
            extra_headers={"X-Conversation-Id": "to-cancel"},
        )
        with stream, pytest.raises(openai.APIError, match="cancelled"):
            for i, _ in enumerate(stream):
                if i == 2:
                    assert s.request("DELETE", "/v1/stream/to-cancel")[0] == 204
