"""Request parsing of the HTTP/1.1 server, and query strings.

A request head is read in two parts. The request line is ringcast's own: any token is a
method (routes answer 405 for those they do not take, after the key check), the target is
raw bytes that must be UTF-8, and a well-formed line in another HTTP version is a 505. The
header fields, their framing and a chunked body are llhttp's (the parser of Node.js and
uvicorn, through ``httptools``), which sees the request line re-written in the one shape it
accepts: a neutral method (its table refuses unknown ones, and CONNECT would make it a
tunnel) and the target with each byte above 0x7F percent-escaped (it refuses raw UTF-8; the
path is percent-decoded by the routes, so ``%C3%A9`` and the raw bytes of ``é`` mean the
same). An ``Upgrade`` is ignored, as RFC 9110 7.8 allows: ringcast only speaks HTTP/1.1.

The errors it raises (:class:`HttpError`) carry the status to answer and whether the
connection must close after it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import unquote_plus

import httptools

MAX_HEAD = 16 * 1024
"""Largest request head (request line and header fields): 414 for a longer request line, 431
for a longer head."""

REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    410: "Gone",
    413: "Payload Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    410: "offset_lost",
    413: "invalid_request_error",
    414: "invalid_request_error",
    416: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    501: "invalid_request_error",
    503: "unavailable_error",
    505: "invalid_request_error",
}

# Matched with fullmatch: ``$`` also matches before a final newline, and so let "5\n"
# (``from=5%0A``) through as 5.
_DECIMAL = re.compile(r"[0-9]{1,19}")
# method SP target SP version: the method a token, the target from "/" on without spaces or
# control characters (bytes above 0x7F are the UTF-8 checked below).
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) "
    rb"(/[^\x00-\x20\x7f]*|[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f]*) (HTTP/[0-9]\.[0-9])"
)
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_EMPTY_LINES = re.compile(rb"(?:\r\n)*")
_AUTHORITY_END = re.compile(rb"[/?]")


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        close: bool = False,
        first_available: int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.close = close
        self.first_available = first_available
        self.headers = headers
        """Header fields the answer carries besides the usual ones (a 405's ``Allow``)."""


class Request:
    __slots__ = (
        "_params",
        "admitted",
        "body",
        "body_stream",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "target",
        "version",
    )

    def __init__(
        self, method: str, path: str, query: str, version: bytes, headers: dict[str, str]
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.target = b""
        """The request target exactly as the client sent it (bytes), for the passthrough."""
        self.content_length = 0
        """The body's ``Content-Length`` (0 without one, or with a chunked body)."""
        self.chunked = False
        """The body comes ``Transfer-Encoding: chunked`` (its length is known at its end)."""
        self.body = b""
        self.body_stream: Any = None
        """With an application that streams this request's body: its
        :class:`~ringcast.http.protocol.BodyStream` (``body`` stays empty)."""
        self._params: list[tuple[str, str]] | None = None
        """The query's parameters, decoded by the first :meth:`query_params`."""
        self.admitted: object = None
        """What the application's admission step (``HttpApp.admit``) made of the head: its
        route and caller, handed back to it with the whole request."""
        conn = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn

    def query_params(self, once: Collection[str] = ()) -> dict[str, str]:
        """First value of each parameter, percent- and plus-decoded; 400 on bad UTF-8, and
        if a parameter named in ``once`` is given more than once (which of two offsets or
        ids was meant cannot be told)."""
        out: dict[str, str] = {}
        if not self.query:
            return out
        pairs = self._params
        if pairs is None:
            # Decoded once per request (a GET's route asks for its id and its offset).
            pairs = []
            for part in self.query.split("&"):
                if not part:
                    continue
                name, _, value = part.partition("=")
                try:
                    pairs.append(
                        (unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict"))
                    )
                except UnicodeDecodeError:
                    raise HttpError(400, "query string is not valid UTF-8") from None
            self._params = pairs
        for name, value in pairs:
            if name in out and name in once:
                raise HttpError(400, f"query parameter {name!r} given more than once")
            out.setdefault(name, value)
        return out


def _escape_non_ascii(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match[0][0]


def _llhttp_error(e: httptools.HttpParserError, what: str) -> HttpError:
    """The answer to what llhttp refused in ``what`` (its reason is in the message)."""
    reason = str(e)
    words = reason.split()
    if what == "request head" and ("CR" in words or "LF" in words or "CRLF" in words):
        # A line ended by a bare LF or CR: refused at once (a head that never ends in
        # CRLF CRLF would otherwise wait for the idle timeout).
        return HttpError(400, f"request head lines must end in CRLF ({reason})", close=True)
    return HttpError(400, f"malformed {what}: {reason}", close=True)


SINGLE_HEADERS = {
    "host": "Host",
    "authorization": "Authorization",
    "x-conversation-id": "X-Conversation-Id",
    "last-event-id": "Last-Event-ID",
}
"""Headers that name one thing (RFC 9112 §3.2: a request with two Host fields is a 400):
given twice, the request is refused rather than their values joined."""


class _Fields:
    """What llhttp reports of a head's fields (its callbacks: an object apart from the
    parser, so that no reference cycle keeps the two alive after the head)."""

    __slots__ = ("complete", "headers", "repeated")
    on_url = on_body = on_message_begin = on_message_complete = None  # (not wanted)
    on_chunk_header = on_chunk_complete = None

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.complete = False
        self.repeated = ""
        """The first of :data:`SINGLE_HEADERS` the head gave twice ("": none)."""

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp checked the name is a token and the value holds no control character but
        # HTAB; it leaves trailing white space on the value.
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers = self.headers
        if key in headers:
            # (A second Content-Length is refused by llhttp.)
            if key in SINGLE_HEADERS and not self.repeated:
                self.repeated = key
            headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self.complete = True


class HeadParser:
    """The head of one request, from the start of a connection's unparsed bytes.

    :meth:`feed` is given the same growing buffer until it returns the head's length; the
    :class:`Request` is then in :attr:`request`, and its body follows in the buffer. llhttp
    sees each byte of the head once, as it arrives, so a malformed line is refused at once.
    """

    __slots__ = (
        "_fed",
        "_fields",
        "_llhttp",
        "_method",
        "_skip",
        "_start",
        "_target",
        "_version",
        "request",
    )

    def __init__(self) -> None:
        self._fields = _Fields()
        self._llhttp = httptools.HttpRequestParser(self._fields)
        self._start = 0
        """Where the request line ends in the buffer (after its CRLF, and after the empty
        lines before it), once read; 0 before."""
        self._skip = 0
        """Bytes of empty lines before the request line, as far as seen (each read goes on
        from there)."""
        self._fed = 0
        """Bytes after the request line given to llhttp so far."""
        self._method = ""
        self._target = b""
        self._version = b""
        self.request: Request | None = None

    def _build(self) -> Request:
        """The :class:`Request` of a head llhttp found whole."""
        target, version, headers = self._target, self._version, self._fields.headers
        if self._fields.repeated:
            # Joined as a list would be, two ids made one ("a1, a2") and a session by it.
            name = SINGLE_HEADERS[self._fields.repeated]
            raise HttpError(400, f"{name} given more than once; send one", close=True)
        try:
            # Raw non-ASCII bytes in a target are UTF-8 (what curl and browsers send for a
            # path typed as ``/v1/stream/café``), as are its percent-escapes.
            text = target.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "request target is not valid UTF-8", close=True) from None
        path, _, query = text.partition("?")
        req = Request(self._method, path, query, version, headers)
        req.target = target
        te = headers.get("transfer-encoding")
        if te is not None:
            # llhttp refused a request whose last transfer coding is not chunked, and one
            # with Content-Length beside it (RFC 9112 6.1, 6.3: a request to smuggle).
            if version == b"HTTP/1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request", close=True)
            if te.lower() != "chunked":
                raise HttpError(
                    501,
                    f"Transfer-Encoding {te[:64]!r} is not supported: send the body plain, "
                    "chunked or with Content-Length",
                    close=True,
                )
            req.chunked = True
        elif "content-length" in headers:
            req.content_length = int(headers["content-length"])  # digits: llhttp checked
        return req

    # -- parsing

    def feed(self, buf: bytearray) -> int:
        """Parse what ``buf`` holds of the head so far: its length once it is whole (the
        caller then drops that much), else 0. Raises :class:`HttpError`."""
        line = b""
        if not self._start:
            line = self._request_line(buf)
            if not line:
                return 0
        start = self._start
        # The head ends at its first empty line: right after the request line's CRLF, or at
        # the first CRLF CRLF after it (llhttp refuses a bare CR or LF in between).
        end = buf.find(b"\r\n\r\n", max(start - 2, start + self._fed - 3))
        stop = len(buf) if end < 0 else end + 4
        if (end if end >= 0 else stop) - self._skip > MAX_HEAD:
            raise HttpError(431, "request head too large", close=True)
        if stop > start + self._fed or line:
            # (One call for a head that came whole: the line and its fields together.)
            self._llhttp_feed(line + buf[start + self._fed : stop])
            self._fed = stop - start
        if end < 0:
            return 0
        assert self._fields.complete  # llhttp saw the empty line
        self.request = self._build()
        return stop

    def _llhttp_feed(self, data: bytes) -> None:
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # ignored (RFC 9110 7.8): the head is whole, the body is read as HTTP/1.1
        except httptools.HttpParserError as e:
            raise _llhttp_error(e, "request head") from None

    def _request_line(self, buf: bytearray) -> bytes:
        """Read and check the request line if it is all there: the line llhttp is to see
        (b"" if it is not all there yet)."""
        # Empty lines before it are skipped (RFC 9112 §2.2: some clients send a CRLF after a
        # body), a head's worth at most.
        m = _EMPTY_LINES.match(buf, self._skip)  # (always matches, maybe nothing)
        skip = self._skip = m.end() if m else self._skip
        if skip > MAX_HEAD:
            raise HttpError(400, "only empty lines where a request line was due", close=True)
        nl = buf.find(b"\n", skip, skip + MAX_HEAD + 1)
        if nl < 0:
            cr = buf.find(b"\r", skip, skip + MAX_HEAD)
            if 0 <= cr < len(buf) - 1 and buf[cr + 1] != 0x0A:
                raise HttpError(400, "request head lines must end in CRLF", close=True)
            if len(buf) - skip > MAX_HEAD:
                raise HttpError(414, f"request line longer than {MAX_HEAD} bytes", close=True)
            return b""
        line = bytes(buf[skip : nl - 1]) if nl > skip else b""
        if nl == skip or buf[nl - 1] != 0x0D or b"\r" in line:
            raise HttpError(400, "request head lines must end in CRLF", close=True)
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            # Not a request line at all (no version: HTTP/0.9's "GET /" included): the
            # client's error. 505 is only for a well-formed request in a version ringcast
            # does not speak.
            raise HttpError(400, "malformed request line", close=True)
        method, target, version = m.groups()
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
        if not target.startswith(b"/"):
            # The absolute form (RFC 9112 §3.2.2, what a client sends to a proxy): its path
            # and query are the target, its authority (up to the first "/", "?" or "#", RFC
            # 3986 §3.2) is not ours to check.
            if b"#" in target:
                raise HttpError(400, "a request target has no fragment ('#')", close=True)
            rest = target[target.index(b"//") + 2 :]
            m = _AUTHORITY_END.search(rest)
            if m is None:
                target = b"/"
            elif m.group() == b"/":
                target = rest[m.start() :]
            else:  # a query right after the authority: the path is "/"
                target = b"/" + rest[m.start() :]
        self._method = method.decode("ascii")
        self._target, self._version = target, version
        escaped = target if target.isascii() else _NON_ASCII.sub(_escape_non_ascii, target)
        self._start = nl + 1
        return b"GET " + escaped + b" " + version + b"\r\n"


class _Chunks:
    """What llhttp reports of a chunked body (its callbacks, apart from the parser)."""

    __slots__ = ("done", "sink", "size")
    on_url = on_header = on_headers_complete = on_message_begin = None  # (not wanted)
    on_chunk_header = on_chunk_complete = None

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.size = 0
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        self.sink(data)

    def on_message_complete(self) -> None:
        self.done = True


_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r\n")
"""A chunk-size line as the walk of :class:`ChunkedBody` reads it: hex digits, then
extensions it does not look into, then CRLF. Broader than llhttp's grammar (llhttp refuses
what it does not take when the line is given to it); what matters is that both read the
same size from any line both take: the leading hex digits."""
_SMALL_CHUNKS = re.compile(
    b"(?:0*(?:"
    + b"|".join(
        b"[%s]" % bytes(sorted({ord(d), ord(d.upper())}))
        + rb"[ \t]*(?:;[^\r\n]*)?\r\n.{%d}\r\n" % int(d, 16)
        for d in "123456789abcdef"
    )
    + b"))*",
    re.DOTALL,
)
"""A run of whole chunks of 1 to 15 bytes, read by the regex engine at once: walked a line
at a time, a body of 1-byte chunks cost ~3 us a chunk (llhttp's own callback costs ~0.5)."""
_SIZE_PART = re.compile(rb"0*([0-9A-Fa-f]*)[ \t]*(;[^\r\n]*)?(\r?)")
"""The start of a size line cut off by the end of the bytes received."""
_CRLF = b"\r\n"


class ChunkedBody:
    """A ``Transfer-Encoding: chunked`` request body, decoded by llhttp as it arrives.

    Its decoder is a parser of its own, given a head that says only "chunked" and then the
    body's bytes: the one the head was read with would take an ``Upgrade`` as the end of HTTP
    and skip the body. :meth:`feed` stops exactly at the body's end, so what follows (a
    pipelined request) stays for the next head; llhttp cannot say where in the bytes it was
    given a body ended, so it must never be given bytes past that end.

    The body can only end after its last chunk (size 0): the chunks before it are walked
    here, size line by size line, and everything up to the last chunk's size line is given
    to llhttp in one call per :meth:`feed` (each chunk's data, whatever it holds, within
    it; a piece with at most one CRLF CRLF is given by runs, as below, and walked after).
    From the last chunk on, or from a line the walk does not read, the body can only
    end right after a CRLF CRLF (the empty line after the last chunk and its trailer
    fields), so the rest is given in runs that end at each of those, and the first run that
    completes the body is the last. The walk reads the size llhttp reads from every line
    both take (the leading hex digits); a line it does not read, or a chunk not followed by
    CRLF, ends the walk, never its agreement with llhttp.

    Given in runs from the start, a body of chunk data dense in CRLF CRLF cost a llhttp call
    per two bytes. Measured (CPU time in process, fed in 64 KiB pieces, the loaded 2-core
    VM, 2026-12-04): 1 MiB of CRLF in one chunk 1,105 -> 2 ms, in 8 KiB chunks 1,129 -> 3
    ms, in 2-byte chunks 439 -> 91 ms, in 16-byte chunks (each walked a line at a time, the
    costliest body now) 569 -> 128 ms (0.18 us per byte); 1-byte chunks of "x" 60 -> 96 ms;
    a small JSON body in one chunk 11.4 -> 12.5 us.
    """

    __slots__ = ("_events", "_left", "_line", "_llhttp", "_tail", "_walking")

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._tail = b""
        """The last (up to) 3 bytes given to llhttp: a CRLF CRLF may straddle two calls."""
        self._walking = True
        """llhttp's place in the body is known: ``_left`` bytes into a chunk, or ``_line``
        into a size line."""
        self._left = 0
        """Bytes of the current chunk (its data and CRLF) not given to llhttp yet; 0 at a
        size line."""
        self._line = b""
        """The start of a size line given to llhttp in an earlier :meth:`feed`, shortened to
        what the walk needs (its size digits, ``;`` if an extension began, a trailing CR)."""
        self._events = _Chunks(sink)
        self._llhttp = httptools.HttpRequestParser(self._events)
        self._llhttp.feed_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")

    @property
    def done(self) -> bool:
        """The body's end was read."""
        return self._events.done

    @property
    def size(self) -> int:
        """Body bytes decoded so far."""
        return self._events.size

    def feed(self, buf: bytearray) -> int:
        """Decode the start of ``buf``, handing the body's bytes to the sink; returns how
        many bytes of ``buf`` were the body's (all of them, unless it ended inside).
        Raises :class:`HttpError` on a malformed body."""
        n = len(buf)
        straddle = -1
        if self._tail:
            joined = self._tail + bytes(buf[:3])
            i = joined.find(b"\r\n\r\n")  # (ends inside buf: the tail is shorter)
            straddle = i + 4 - len(self._tail) if i >= 0 else -1
        # A piece with at most one CRLF CRLF (most bodies, whole) costs at most two runs:
        # given by runs, and walked after (to know where the next piece starts).
        walk_after = self._walking and buf.count(b"\r\n\r\n") < 2
        pos = self._walk(buf) if self._walking and not walk_after else 0
        with memoryview(buf) as view:
            if pos:
                try:
                    self._llhttp.feed_data(view[:pos])
                except httptools.HttpParserError as e:
                    raise _llhttp_error(e, "chunked body") from None
                except httptools.HttpParserUpgrade:
                    self._events.done = True  # (as below: a request after the body)
                if self._events.done:
                    # Never: the walk stops before the last chunk. Were it wrong, llhttp
                    # would have read on into what follows the body: refused, not served.
                    raise HttpError(400, "malformed chunked body", close=True)
            while pos < n and not self._events.done:
                if straddle > pos:
                    end, straddle = straddle, -1
                else:
                    i = buf.find(b"\r\n\r\n", max(pos - 3, 0))
                    end = i + 4 if i >= 0 else n
                try:
                    self._llhttp.feed_data(view[pos:end])
                except httptools.HttpParserError as e:
                    raise _llhttp_error(e, "chunked body") from None
                pos = end
        if walk_after and not self._events.done:
            self._walk(buf)  # (llhttp took all of buf)
        self._tail = (self._tail + bytes(buf[max(0, pos - 3) : pos]))[-3:]
        return pos

    def _walk(self, buf: bytearray) -> int:
        """How much of ``buf`` llhttp can be given at once: all of it, or up to the last
        chunk's size line, or up to what the walk does not read (which ends the walk)."""
        n, p, left, line = len(buf), 0, self._left, self._line
        while p < n:
            if left:
                q = p + left
                # The chunk's CRLF, as much of it as is in buf: llhttp refuses another, and
                # the walk would lose its place.
                lo = max(q - 2, p)
                if lo < n and buf[lo : min(q, n)] != _CRLF[2 - (q - lo) :][: n - lo]:
                    break
                if q > n:
                    left, p = q - n, n
                    break
                left, p = 0, q
                continue
            if line:
                nl = buf.find(b"\n", p)
                if nl < 0:
                    line = _partial_size_line(line + bytes(buf[p:]))
                    if not line:
                        break
                    p = n
                    break
                m = _SIZE_LINE.fullmatch(line + bytes(buf[p : nl + 1]))
                end, line = nl + 1, b""
            else:
                m = _SIZE_LINE.match(buf, p)
                if m is None:
                    if buf.find(b"\n", p) >= 0:
                        break
                    line = _partial_size_line(bytes(buf[p:]))
                    if not line:
                        break
                    p = n
                    break
                end = m.end()
            size = int(m[1], 16) if m is not None else 0
            if size == 0:
                break  # the last chunk, or a line the walk does not read
            if size < 16:
                # Small chunks, maybe many: as many whole ones as the regex engine takes.
                q = _SMALL_CHUNKS.match(buf, p).end()  # type: ignore[union-attr]
                if q > p:
                    p = q
                    continue
            p, left = end, size + 2
        else:
            # All of buf read; the walk goes on in the next piece.
            self._left, self._line = left, line
            return p
        if p == n and (left or line):
            self._left, self._line = left, line  # (cut off by buf's end: goes on)
            return p
        self._walking, self._left, self._line = False, 0, b""
        return p


def _partial_size_line(start: bytes) -> bytes:
    """The start of a size line cut off by the end of a piece, shortened to what the walk
    needs of it (its size digits, ``;`` if an extension began, a trailing CR); b"" if no size
    line starts so."""
    m = _SIZE_PART.fullmatch(start)
    if m is None:
        return b""
    digits, ext, cr = m.groups()
    return (digits or b"0") + (b";" if ext is not None else b"") + cr


MAX_CHUNK_FRAMING = 64 * 1024
"""Bytes of chunk framing (size lines, extensions, trailer fields) a held chunked body may
carry beyond the same again of its limit: past that it is a 413 too."""


def too_large(size: int, limit: int, chunked: bool = False) -> HttpError:
    """The 413 for a request body of ``size`` bytes (so far, if ``chunked``) above ``limit``."""
    what = "chunked request body" if chunked else f"request body of {size} bytes"
    return HttpError(413, f"{what} exceeds the limit of {limit} bytes (--max-body)", close=True)


class RequestBody:
    """The body of one request as it arrives: ``length`` bytes (its ``Content-Length``; 0
    without a body), or chunked (decoded by :class:`ChunkedBody`). Held whole up to ``limit``
    bytes (413 past it), or handed to ``sink`` as it comes (``limit`` None)."""

    __slots__ = ("_chunks", "_held", "_joined", "_limit", "_need", "_raw", "_sink", "done")

    def __init__(
        self,
        length: int,
        chunked: bool,
        limit: int | None,
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        self._need = length
        self._limit = limit
        self._sink = sink
        self._held: list[bytes] = []
        self._joined = bytearray()
        """A held chunked body, decoded: one buffer, not a bytes object per piece llhttp
        hands over (a body of CRLFs came in two-byte pieces: ~23 MiB of objects per MiB)."""
        self._raw = 0
        # (The held body's sink is its buffer's extend: no reference cycle through the decoder.)
        self._chunks = ChunkedBody(sink or self._joined.extend) if chunked else None
        self.done = not chunked and not length

    def feed(self, buf: bytearray) -> int:
        """Take what ``buf`` holds of the body; returns how many bytes of it were the body's
        (the caller drops them). Raises :class:`HttpError`: 400 for a malformed chunked body,
        413 past the limit."""
        if self.done:
            return 0
        chunks = self._chunks
        if chunks is None:
            if self._sink is None:
                # Held: one copy, once it is all here.
                if len(buf) < self._need:
                    return 0
                self._held.append(bytes(buf[: self._need]))
                taken = self._need
            else:
                taken = min(self._need, len(buf))
                if taken:
                    self._sink(bytes(buf[:taken]))
            self._need -= taken
            self.done = self._need == 0
            return taken
        used = chunks.feed(buf)
        self._raw += used
        limit = self._limit
        if limit is not None and (chunks.size > limit or self._raw > 2 * limit + MAX_CHUNK_FRAMING):
            raise too_large(chunks.size, limit, chunked=True)
        self.done = chunks.done
        return used

    def take(self) -> bytes:
        """The held body, once :attr:`done`."""
        if self._chunks is not None:
            joined, self._joined = self._joined, bytearray()
            return bytes(joined)
        held, self._held = self._held, []
        return held[0] if len(held) == 1 else b"".join(held)


def parse_offset(value: str | None, what: str) -> int:
    """A byte offset from a query parameter or header (``None`` or ``""``: not given, 0, as
    llama-server reads an absent or empty ``from``); 400 if malformed or too large for any
    stream."""
    if not value:
        return 0
    if not _DECIMAL.fullmatch(value):
        if value.isdigit() and value.isascii():
            raise HttpError(
                400,
                f"invalid {what} {value[:32]!r}: larger than any stream can be (at most 19 "
                "decimal digits)",
            )
        raise HttpError(
            400, f"invalid {what} {value[:32]!r}: expected a non-negative decimal byte offset"
        )
    return int(value)
