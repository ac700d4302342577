"""The worker's event framing (``ringcast.server.emitter``): a text chunk encoded around its
content once per stream gives the same bytes as the chunk ``Struct`` encoded whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ringcast import Segment
from ringcast.server.counters import SharedCounters
from ringcast.server.emitter import _SENTINEL, Emitter
from ringcast.wire.openai import Usage
from ringcast.wire.sse import DONE_EVENT, frame_event

pytestmark = pytest.mark.timeout(120)

# Text that JSON must escape, or that is multi-byte in UTF-8, or both.
AWKWARD = [
    "",
    " the",
    'quote " and backslash \\',
    "\n\r\t\b\f",
    "\x00\x01\x1f\x7f",
    "\u2028\u2029",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 😀🚀",
    "</script>",
    _SENTINEL,
    "a" * 5000,
]


@pytest.fixture
def segment(tmp_path: Path):  # type: ignore[no-untyped-def]
    seg = Segment.create(str(tmp_path / "emit.seg"), max_sessions=8, session_bytes=1 << 20)
    yield seg
    seg.close()


@pytest.fixture
def counters(tmp_path: Path) -> SharedCounters:
    c = SharedCounters(str(tmp_path / "counters"), 2, create=True)
    c.bind_row(1)
    return c


def _stream(seg: Segment, name: str) -> bytes:
    r = seg.reader(name, 0, "")
    out = r.read_nowait(1 << 20)
    r.close()
    return out or b""  # None: nothing written yet


def _expected(emitter: Emitter, pieces: list[str]) -> bytes:
    """The stream as ``Emitter`` wrote it before the fast path: every chunk a whole Struct."""
    events = []
    if emitter.route == "chat" and pieces:  # the role chunk comes with the first token
        events.append(emitter._chunk("", role="assistant"))
    events += [emitter._chunk(p) for p in pieces]
    out = b""
    for ev in events:
        out += frame_event(len(out), ev)
    return out


def _emit(
    seg: Segment, counters: SharedCounters, name: str, route: str, model: str, pieces: list[str]
) -> tuple[Emitter, bytes]:
    w = seg.create_or_replace(name, "")
    e = Emitter(w, route, model, counters)
    for p in pieces:
        e.text(p)
    return e, _stream(seg, name)


@pytest.mark.parametrize("route", ["chat", "completion"])
@pytest.mark.parametrize("model", ["ringcast", 'odd "model" \\ é', _SENTINEL, ""])
def test_text_chunks_are_the_struct_bytes(
    segment: Segment, counters: SharedCounters, route: str, model: str
) -> None:
    e, got = _emit(segment, counters, f"{route}-{len(model)}", route, model, AWKWARD)
    assert got == _expected(e, AWKWARD)
    # A model or id holding the sentinel takes the slow path, with the same bytes.
    assert (e._text_frame is None) == (_SENTINEL in model)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(), max_size=8), st.sampled_from(["chat", "completion"]))
def test_any_text_gives_the_struct_bytes(
    segment: Segment, counters: SharedCounters, pieces: list[str], route: str
) -> None:
    try:
        e, got = _emit(segment, counters, "prop", route, "m", pieces)
    except UnicodeEncodeError:
        # A lone surrogate: msgspec refuses it, the whole-Struct path as much as this one.
        with pytest.raises(UnicodeEncodeError):
            Emitter(segment.create_or_replace("p2", ""), route, "m", counters)._chunk(
                "".join(pieces)
            )
        return
    assert got == _expected(e, pieces)


def test_finish_follows_the_text(segment: Segment, counters: SharedCounters) -> None:
    e, _ = _emit(segment, counters, "fin", "chat", "m", ["a", "b"])
    e.finish("stop", 3)
    got = _stream(segment, "fin")
    body = _expected(e, ["a", "b"])
    body += frame_event(len(body), e._chunk(None, finish="stop", usage=Usage(3, 2, 5)))
    body += frame_event(len(body), DONE_EVENT)
    assert got == body


@pytest.mark.parametrize("route", ["chat", "completion"])
@pytest.mark.parametrize(
    "model",
    # The last three hold the sentinels of the templates: those chunks are built whole.
    ["ringcast", 'odd "model" \\ é', "", _SENTINEL, "7312605948213406271", "7312605948213406273"],
)
@pytest.mark.parametrize("reason", ["stop", "length", 'we"ird \\ é 7312605948213406272'])
def test_templated_role_and_final_chunks_are_the_struct_bytes(
    segment: Segment, counters: SharedCounters, route: str, model: str, reason: str
) -> None:
    """The role and final chunks come from per-process templates filled with each stream's
    id, creation time and usage: the same bytes as the Structs encoded whole."""
    # The second and third streams use the templates the first made; the third's id holds
    # the sentinels' digits (a caller's chunk id may hold anything).
    ids = [None, None, "chatcmpl-7312605948213406271-7312605948213406273"]
    for n, chunk_id in enumerate(ids):
        e = Emitter(
            segment.create_or_replace(f"t{n}", ""), route, model, counters, chunk_id=chunk_id
        )
        e.tokens = 17 + n
        assert e._role_chunk == e._chunk("", role="assistant")
        assert e._final_chunk(reason, 5) == e._chunk(
            None, finish=reason, usage=Usage(5, 17 + n, 22 + n)
        )
