"""Inference workers of ``ringcast serve``: the producers that append SSE bytes to sessions.

A worker (``python -m ringcast.worker CONFIG INDEX``, spawned by the manager) listens on a
Unix socket for jobs from the HTTP processes, adopts each job's session
(``Segment.adopt``), answers ``A`` and then generates on its own: the HTTP process and its
client may go away, the generation continues until it ends or the session is cancelled.
Cancellation (DELETE, replacement, eviction, an anonymous client's disconnect) is seen by
polling ``Writer.cancelled`` — an atomic load — every 20 ms for every active job, so it
stops a job also while it waits for its first token or for an upstream server.

Three sources of tokens:

- the **synthetic model** (default): deterministic text derived from the prompt, paced at
  ``--tokens-per-s`` after an optional ``--prefill-s``, honouring ``max_tokens``;
- the **upstream proxy** (``--upstream URL``, ``http://`` or ``https://``; certificates are
  checked against the system's CAs or ``--upstream-ca-file``): forwards the request (forced to
  ``stream: true``) to any OpenAI-compatible server and appends each SSE event as it arrives,
  unchanged except for ringcast's own ``id:`` line; cancelling closes the upstream connection,
  which is how llama-server and vLLM learn to stop. An upstream that sends nothing for
  ``$RINGCAST_UPSTREAM_READ_TIMEOUT`` seconds (default 600) fails the job with a 504 error
  event, and a stream that ends without ``data: [DONE]`` (the upstream died, a proxy cut it)
  with a 502 one: a cut answer is never passed off as a whole one;
- a **plug-in** (``--generator module:function``), an async generator function::

      # mypkg/model.py
      from ringcast.worker import JobContext

      async def generate(ctx: JobContext):
          prompt = ctx.prompt_text()          # messages or prompt, flattened
          for word in prompt.split():
              yield word + " "                # str: wrapped into a chunk for you
          ctx.finish_reason = "stop"

  Each ``str`` becomes one ``chat.completion.chunk`` (or ``text_completion``) event;
  ``bytes`` are appended as one raw SSE event (e.g. ``b"data: {...}\\n\\n"``). ringcast writes
  the role chunk first and the final chunk (``finish_reason`` and ``usage``) plus
  ``data: [DONE]`` last. If the session is cancelled the generator is closed
  (``GeneratorExit`` at its ``yield``, or ``CancelledError`` at its ``await``). Raising an
  exception ends the stream with an SSE error event and state ``failed``.

Every event is framed ``id: <offset after it>\\n...`` (see ``ringcast.protocol.frame_event``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import math
import os
import random
import secrets
import signal
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec

from ringcast._core import RingcastError, Segment, SessionEnded, SessionNotFound, Writer
from ringcast.manager import (
    ServeConfig,
    SharedCounters,
    WorkerCounter,
    child_main,
    default_port,
    open_child_counters,
)
from ringcast.protocol import (
    DONE_EVENT,
    JOB_ACK_ADOPTED,
    JOB_ACK_GONE,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    Delta,
    Job,
    Usage,
    chat_request_decoder,
    completion_request_decoder,
    error_event,
    frame_event,
    iter_sse_data,
    job_decoder,
    json_encoder,
    strip_id_lines,
)

log = logging.getLogger("ringcast.worker")

CANCEL_POLL = 0.02
PING_EVENT = b": ping\n\n"
UPSTREAM_CONNECT_TIMEOUT = 10.0
# Seconds an upstream may send nothing (no line of its head, no body bytes) before the job
# fails. Generous, because a long prompt's prefill can be silent: no default here can know the
# model. $RINGCAST_UPSTREAM_READ_TIMEOUT overrides it (upstream_read_timeout).
UPSTREAM_READ_TIMEOUT = 600.0

T = TypeVar("T")


class Gone(Exception):
    """The session ended under the producer (cancelled, replaced or evicted)."""


class JobContext:
    """What a generator gets: the request, and a way to see cancellation.

    ``request`` is the decoded body (``ChatCompletionRequest`` or ``CompletionRequest``),
    ``body`` the raw JSON bytes (unknown fields included). Set ``finish_reason`` before
    returning to override ``"stop"``.
    """

    def __init__(
        self,
        route: str,
        body: bytes,
        request: ChatCompletionRequest | CompletionRequest,
        writer: Writer,
    ) -> None:
        self.route = route
        self.body = body
        self.request = request
        self.finish_reason = "stop"
        self._writer = writer

    @property
    def cancelled(self) -> bool:
        return self._writer.cancelled

    @property
    def max_tokens(self) -> int | None:
        r = self.request
        if isinstance(r, ChatCompletionRequest) and r.max_tokens is None:
            return r.max_completion_tokens
        return r.max_tokens

    def prompt_text(self) -> str:
        r = self.request
        if isinstance(r, CompletionRequest):
            return r.prompt if isinstance(r.prompt, str) else "\n".join(r.prompt)
        parts: list[str] = []
        for m in r.messages:
            if isinstance(m.content, str):
                parts.append(m.content)
            elif m.content:
                parts.extend(str(p.get("text", "")) for p in m.content)
        return "\n".join(parts)


GenerateFn = Callable[[JobContext], AsyncIterator[str | bytes]]


class Emitter:
    """Frames and appends events for one session; raises ``Gone`` once writes are refused."""

    def __init__(
        self,
        writer: Writer,
        route: str,
        model: str,
        counters: SharedCounters,
        chunk_id: str | None = None,
    ) -> None:
        self.writer = writer
        self.route = route
        self.model = model
        self.counters = counters
        self.id = chunk_id or (
            ("chatcmpl-" if route == "chat" else "cmpl-") + secrets.token_hex(12)
        )
        self.created = int(time.time())
        self.tokens = 0
        self.started = False

    def raw(self, event: bytes) -> None:
        w = self.writer
        if not w.write(frame_event(w.total_bytes, event)):
            raise Gone

    def _chunk(
        self,
        content: str | None,
        role: str | None = None,
        finish: str | None = None,
        usage: Usage | None = None,
    ) -> bytes:
        obj: ChatCompletionChunk | CompletionChunk
        if self.route == "chat":
            obj = ChatCompletionChunk(
                self.id,
                "chat.completion.chunk",
                self.created,
                self.model,
                [ChatChunkChoice(0, Delta(role, content), finish)],
                usage=usage,
            )
        else:
            obj = CompletionChunk(
                self.id,
                "text_completion",
                self.created,
                self.model,
                [CompletionChoice(0, content or "", finish)],
                usage=usage,
            )
        return b"data: " + json_encoder.encode(obj) + b"\n\n"

    def start(self) -> None:
        """The role chunk, written with the first token (as llama-server does), so nothing
        is appended while the prompt is processed."""
        if not self.started:
            self.started = True
            if self.route == "chat":
                self.raw(self._chunk("", role="assistant"))

    def text(self, piece: str) -> None:
        self.start()
        self.raw(self._chunk(piece))
        self.tokens += 1

    def finish(self, reason: str, prompt_tokens: int) -> None:
        self.start()
        usage = Usage(prompt_tokens, self.tokens, prompt_tokens + self.tokens)
        self.raw(self._chunk(None, finish=reason, usage=usage))
        self.raw(DONE_EVENT)


# --------------------------------------------------------------------------------------------
# Synthetic model

VOCAB = (
    "the a ring of bytes keeps every token so readers can come back later and resume "
    "from an offset while the producer never waits for anyone slow lighthouse keeper "
    "watched ships pass through fog at night sea wind stone lamp shore quiet bright old "
    "small story once upon time stream resumes cleanly across processes shared memory"
).split()


def synthetic_tokens(prompt: str, n: int) -> Iterator[str]:
    """Deterministic text for a prompt: the same prompt always gives the same tokens.

    Made one at a time: ``max_tokens`` comes from the client, and ``10**9`` must cost no more
    memory or work up front than ``16``.
    """
    rng = random.Random(zlib.crc32(prompt.encode("utf-8", "surrogatepass")))
    for i in range(n):
        yield (" " if i else "") + rng.choice(VOCAB)


def synthetic_model(cfg: ServeConfig) -> GenerateFn:
    async def generate(ctx: JobContext) -> AsyncIterator[str | bytes]:
        mt = ctx.max_tokens
        n = cfg.default_max_tokens if mt is None else mt
        loop = asyncio.get_running_loop()
        if cfg.prefill_s > 0:
            await asyncio.sleep(cfg.prefill_s)
        t0 = loop.time()
        tps = cfg.tokens_per_s
        for i, tok in enumerate(synthetic_tokens(ctx.prompt_text(), n)):
            if tps > 0 and (delay := t0 + i / tps - loop.time()) > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 31:
                # Unpaced, or behind the pace (a fast --tokens-per-s): a long generation still
                # lets the worker's other jobs and its cancellation poll run.
                await asyncio.sleep(0)
            yield tok
        ctx.finish_reason = "length"

    return generate


def load_generator(spec: str) -> GenerateFn:
    """Import ``module:function`` (the ``--generator`` flag)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--generator {spec!r}: expected 'module:function'")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"--generator {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Upstream proxy


class UpstreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def upstream_read_timeout() -> float:
    """``$RINGCAST_UPSTREAM_READ_TIMEOUT`` if it is a positive number of seconds, else
    ``UPSTREAM_READ_TIMEOUT`` (with a warning if the variable is set to anything else)."""
    raw = os.environ.get("RINGCAST_UPSTREAM_READ_TIMEOUT", "").strip()
    if not raw:
        return UPSTREAM_READ_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds) and seconds > 0:
        return seconds
    log.warning(
        "RINGCAST_UPSTREAM_READ_TIMEOUT=%r is not a positive number of seconds; "
        "using the default, %g s",
        raw,
        UPSTREAM_READ_TIMEOUT,
    )
    return UPSTREAM_READ_TIMEOUT


class UpstreamReader:
    """The upstream connection's reader, where a read that waits ``timeout`` seconds for a
    byte fails the job (504) instead of hanging it: a stalled upstream never says so."""

    def __init__(self, reader: asyncio.StreamReader, name: str, timeout: float) -> None:
        self._reader = reader
        self.name = name
        self.timeout = timeout
        self.waiting_for = "its response head"

    async def readline(self) -> bytes:
        return await self._within(self._reader.readline())

    async def read(self, n: int) -> bytes:
        return await self._within(self._reader.read(n))

    async def readexactly(self, n: int) -> bytes:
        try:
            return await self._within(self._reader.readexactly(n))
        except asyncio.IncompleteReadError:
            raise UpstreamError(502, "upstream closed the connection mid-response") from None

    async def _within(self, read: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await read
        except TimeoutError:
            raise UpstreamError(
                504,
                f"upstream {self.name} sent nothing for {self.timeout:g} s while ringcast "
                f"waited for {self.waiting_for}; if its prefills take longer, raise "
                "$RINGCAST_UPSTREAM_READ_TIMEOUT (and --idle-timeout, which also ends a "
                "stream that makes no progress)",
            ) from None
        except OSError as e:  # reset, or a TLS error (ssl.SSLError is an OSError)
            raise UpstreamError(
                502, f"upstream {self.name}: the connection was lost ({e})"
            ) from None


def _is_done_event(event: bytes) -> bool:
    return b"[DONE]" in event and iter_sse_data(event) == [b"[DONE]"]


async def _read_body(reader: UpstreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """Yield response body bytes as they arrive (chunked, Content-Length or until close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readline()
            if not line:
                raise UpstreamError(502, "upstream closed the connection mid-response")
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise UpstreamError(502, "upstream sent a malformed chunk") from None
            if size == 0:
                while (await reader.readline()).strip():
                    pass
                return
            while size:
                data = await reader.read(min(size, 65536))
                if not data:
                    raise UpstreamError(502, "upstream closed the connection mid-response")
                size -= len(data)
                yield data
            await reader.readexactly(2)
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise UpstreamError(502, "upstream closed the connection mid-response")
            left -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


def check_upstream(upstream: str, ca_file: str | None) -> str | None:
    """What is wrong with ``--upstream`` / ``--upstream-ca-file``, or None (checked by
    ``ringcast serve`` before it starts anything)."""
    if not upstream:
        return "--upstream-ca-file only applies with an https --upstream"
    try:
        url = urlsplit(upstream)
        url.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    except ValueError as e:
        return f"--upstream {upstream!r} is not a valid URL ({e})"
    if url.scheme not in ("http", "https"):
        return f"--upstream {upstream!r}: the URL must start with http:// or https://"
    if not url.hostname:
        return f"--upstream {upstream!r} names no host"
    if url.query or url.fragment or url.username or url.password:
        return (
            f"--upstream {upstream!r}: give scheme, host, port and path only "
            "(the key goes in --upstream-api-key)"
        )
    if ca_file:
        if url.scheme != "https":
            return "--upstream-ca-file only applies with an https --upstream"
        try:
            upstream_tls(ca_file)
        except (OSError, ssl.SSLError) as e:
            return f"--upstream-ca-file {ca_file!r}: cannot load CA certificates ({e})"
    return None


@functools.cache
def upstream_tls(ca_file: str) -> ssl.SSLContext:
    """The client TLS context for an https upstream: certificate and host name checked,
    against ``ca_file`` if given, else the system's CAs (made once per process)."""
    return ssl.create_default_context(cafile=ca_file or None)


async def proxy_upstream(
    cfg: ServeConfig, job: Job, emitter: Emitter, read_timeout: float = UPSTREAM_READ_TIMEOUT
) -> None:
    """Forward ``job`` to ``cfg.upstream`` and append its SSE events as they arrive.

    Raises ``UpstreamError`` if the upstream cannot be reached, answers anything but 200,
    sends nothing for ``read_timeout`` seconds, or ends its stream without ``data: [DONE]``.
    """
    url = urlsplit(cfg.upstream)
    if url.scheme not in ("http", "https") or not url.hostname:
        # `ringcast serve` refuses such a URL at start-up (check_upstream).
        raise UpstreamError(500, f"unsupported upstream URL {cfg.upstream!r}")
    tls = url.scheme == "https"
    base = url.path.rstrip("/")
    route = "/chat/completions" if job.route == "chat" else "/completions"
    path = (base if base.endswith("/v1") else base + "/v1") + route
    body = msgspec.json.decode(job.body)
    if isinstance(body, dict):
        body["stream"] = True
    payload = msgspec.json.encode(body)
    host = url.hostname
    port = url.port or default_port(url.scheme)
    # Host header: brackets around an IPv6 literal, no port when it is the scheme's default.
    authority = f"[{host}]" if ":" in host else host
    if port != default_port(url.scheme):
        authority += f":{port}"
    try:
        raw_reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=upstream_tls(cfg.upstream_ca_file) if tls else None,
                server_hostname=host if tls else None,
            ),
            UPSTREAM_CONNECT_TIMEOUT,
        )
    except TimeoutError:
        raise UpstreamError(504, f"upstream {host}:{port} did not accept a connection") from None
    except ssl.SSLCertVerificationError as e:
        raise UpstreamError(
            502,
            f"upstream {host}:{port}: TLS certificate not trusted ({e.verify_message}); "
            "for a private CA or a self-signed server give --upstream-ca-file",
        ) from None
    except ssl.SSLError as e:
        raise UpstreamError(502, f"upstream {host}:{port}: TLS handshake failed ({e})") from None
    except OSError as e:
        raise UpstreamError(502, f"upstream {host}:{port} unreachable: {e.strerror}") from None
    reader = UpstreamReader(raw_reader, f"{host}:{port}", read_timeout)
    try:
        auth = f"Authorization: Bearer {cfg.upstream_api_key}\r\n" if cfg.upstream_api_key else ""
        writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
                f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(payload)}\r\n{auth}Connection: close\r\n\r\n"
            ).encode("latin-1")
            + payload
        )
        status_line = await reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise UpstreamError(502, "upstream sent a malformed status line")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            raw = bytearray()
            async for data in _read_body(reader, headers):
                raw += data
                if len(raw) > 4096:
                    break
            message = raw.decode("utf-8", "replace")[:1000]
            try:
                err = msgspec.json.decode(bytes(raw))
                message = str(err["error"]["message"])
            except Exception:
                pass
            raise UpstreamError(status, f"upstream answered {status}: {message}")
        reader.waiting_for = "more of its stream"
        buf = b""
        done = False
        async for data in _read_body(reader, headers):
            buf += data
            if b"\r" in buf and not buf.endswith(b"\r"):
                buf = buf.replace(b"\r\n", b"\n")
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[: end + 2], buf[end + 2 :]
                event = strip_id_lines(event)
                if event.strip():
                    done = done or _is_done_event(event)
                    emitter.raw(event)
                    emitter.counters.inc(WorkerCounter.TOKENS)
            if done:
                # The answer is whole: do not wait on an upstream that keeps the connection
                # open after it (the `finally` closes it).
                buf = b""
                break
        if buf.strip():
            event = strip_id_lines(buf.rstrip(b"\n") + b"\n\n")
            done = done or _is_done_event(event)
            emitter.raw(event)
        if not done:
            # The end of a body is no proof the answer is whole: a close-delimited body ends at
            # any EOF, and a proxy in between may end a chunked one cleanly when its upstream dies.
            raise UpstreamError(
                502,
                f"upstream {host}:{port} closed the stream before `data: [DONE]`: the answer "
                "was cut short (the upstream or a proxy in between failed); see its logs",
            )
    finally:
        # On cancellation this is what tells the upstream to stop generating.
        writer.transport.abort()


# --------------------------------------------------------------------------------------------
# The worker process


class WorkerApp:
    def __init__(
        self,
        cfg: ServeConfig,
        seg: Segment,
        counters: SharedCounters,
        generate: GenerateFn | None,
        upstream_read_timeout: float = UPSTREAM_READ_TIMEOUT,
    ) -> None:
        self.cfg = cfg
        self.seg = seg
        self.counters = counters
        self.generate = generate
        self.upstream_read_timeout = upstream_read_timeout
        self.active: dict[asyncio.Task[None], Writer] = {}
        self.shutting_down = False

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            (n,) = struct.unpack("!I", await r.readexactly(4))
            job = job_decoder.decode(await r.readexactly(n))
        except (asyncio.IncompleteReadError, msgspec.DecodeError, struct.error):
            w.close()
            return
        if self.shutting_down:
            w.close()  # the HTTP process fails the session itself
            return
        try:
            writer = self.seg.adopt(job.conversation_id, job.owner, job.generation)
        except (SessionNotFound, SessionEnded):
            w.write(JOB_ACK_GONE)
            w.close()
            return
        except RingcastError:
            log.exception("could not adopt a session")
            w.close()  # no ack: the HTTP process fails the session itself
            return
        task = asyncio.get_running_loop().create_task(self.run_job(job, writer))
        self.active[task] = writer
        self.counters.inc(WorkerCounter.ACTIVE)
        task.add_done_callback(self._job_done)
        w.write(JOB_ACK_ADOPTED)
        with contextlib.suppress(OSError):
            await w.drain()
        w.close()

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self.active.pop(task, None)
        self.counters.inc(WorkerCounter.ACTIVE, -1)

    async def run_job(self, job: Job, writer: Writer) -> None:
        self.counters.inc(WorkerCounter.JOBS_STARTED)
        emitter = Emitter(writer, job.route, self.cfg.model_name, self.counters)
        try:
            if self.generate is None and self.cfg.upstream:
                await proxy_upstream(self.cfg, job, emitter, self.upstream_read_timeout)
            else:
                await self.run_generator(job, writer, emitter)
            writer.finalize("done")
            self.counters.inc(WorkerCounter.JOBS_DONE)
        except (Gone, asyncio.CancelledError):
            if self.shutting_down and not writer.cancelled:
                self._fail(writer, 503, "the server is shutting down", "server_shutdown")
            else:
                self.counters.inc(WorkerCounter.JOBS_CANCELLED)
        except UpstreamError as e:
            self._fail(writer, e.code, str(e), "upstream_error")
        except Exception as e:
            log.exception("generator failed")
            self._fail(writer, 500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    def _fail(self, writer: Writer, code: int, message: str, type_: str) -> None:
        self.counters.inc(WorkerCounter.JOBS_FAILED)
        if writer.write(frame_event(writer.total_bytes, error_event(code, message, type_))):
            writer.finalize("failed")

    async def run_generator(self, job: Job, writer: Writer, emitter: Emitter) -> None:
        request: ChatCompletionRequest | CompletionRequest
        if job.route == "chat":
            request = chat_request_decoder.decode(job.body)
        else:
            request = completion_request_decoder.decode(job.body)
        ctx = JobContext(job.route, job.body, request, writer)
        gen_fn = self.generate or synthetic_model(self.cfg)
        # A generator marked ``ringcast_raw_stream`` yields a whole stream's SSE events (e.g. a
        # recorded one, ringcast.replay): no role chunk, final chunk or [DONE] of ours.
        raw = getattr(gen_fn, "ringcast_raw_stream", False)
        gen = gen_fn(ctx)
        try:
            async for piece in gen:
                if isinstance(piece, str):
                    emitter.text(piece)
                else:
                    if not raw:
                        emitter.start()
                    emitter.raw(piece)
                self.counters.inc(WorkerCounter.TOKENS)
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        if not raw:
            emitter.finish(ctx.finish_reason, len(ctx.prompt_text().split()))

    async def watch_cancel(self) -> None:
        """Cancel jobs whose session was cancelled; ping streams that stay silent."""
        loop = asyncio.get_running_loop()
        interval = self.cfg.sse_ping_interval
        progress: dict[asyncio.Task[None], tuple[int, float]] = {}
        while True:
            await asyncio.sleep(CANCEL_POLL)
            now = loop.time()
            for task, writer in list(self.active.items()):
                if writer.cancelled:
                    if not task.done():
                        task.cancel()
                    continue
                if interval <= 0:
                    continue
                total = writer.total_bytes
                last = progress.get(task)
                if last is None or last[0] != total:
                    progress[task] = (total, now)
                elif now - last[1] >= interval and writer.write(PING_EVENT, progress=False):
                    # A comment, not an event: no id line, the next event's id counts it. Not
                    # progress either: a stream that only pings can still be found idle.
                    progress[task] = (writer.total_bytes, now)
            for task in [t for t in progress if t not in self.active]:
                del progress[task]

    async def shutdown(self) -> None:
        self.shutting_down = True
        for task in list(self.active):
            task.cancel()
        if self.active:
            await asyncio.wait(list(self.active), timeout=3.0)


async def serve_worker(cfg: ServeConfig, index: int) -> None:
    seg = Segment.open(cfg.segment)
    counters = open_child_counters(cfg, "worker", index)
    counters.set(WorkerCounter.ACTIVE, 0)
    generate = load_generator(cfg.generator) if cfg.generator else None
    if cfg.replay:
        from ringcast.replay import replay_generator

        generate = replay_generator(cfg.replay, cfg.replay_speed)
    # Read here, once logging is set up, so a bad value is reported when the worker starts.
    read_timeout = upstream_read_timeout() if cfg.upstream else UPSTREAM_READ_TIMEOUT
    app = WorkerApp(cfg, seg, counters, generate, read_timeout)
    path = os.path.join(cfg.run_dir, f"worker-{index}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(app.handle, path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    watcher = loop.create_task(app.watch_cancel())
    Path(cfg.run_dir, f"ready-worker-{index}").write_text(str(os.getpid()))
    await stop.wait()
    server.close()
    await app.shutdown()
    watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    child_main("worker", serve_worker, argv)


if __name__ == "__main__":
    main()
