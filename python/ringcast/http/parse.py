"""Request parsing of the HTTP/1.1 server: request line, headers, body length, query strings.

The errors it raises (:class:`HttpError`) carry the status to answer and whether the
connection must close after it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

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
    411: "Length Required",
    413: "Payload Too Large",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    410: "offset_lost",
    411: "invalid_request_error",
    413: "invalid_request_error",
    416: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "unavailable_error",
    505: "invalid_request_error",
}

# Matched with fullmatch: ``$`` also matches before a final newline, and so let "5\n"
# (``from=5%0A``) through as 5.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DECIMAL = re.compile(r"[0-9]{1,19}")
# Control characters other than HTAB in a header value (RFC 9110 5.5): refused, never passed on.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_CTL = re.compile(rb"[\x00-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        close: bool = False,
        first_available: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")
        self.close = close
        self.first_available = first_available


class Request:
    __slots__ = (
        "admitted",
        "body",
        "body_stream",
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
        self.body = b""
        self.body_stream: Any = None
        """With an application that streams this request's body: its
        :class:`~ringcast.http.protocol.BodyStream` (``body`` stays empty)."""
        self.admitted: object = None
        """What the application's admission step (``HttpApp.admit``) made of the head: its
        route and caller, handed back to it with the whole request."""
        conn = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.keep_alive = "close" not in conn
        else:
            self.keep_alive = "keep-alive" in conn

    def query_params(self) -> dict[str, str]:
        """First value of each parameter, percent- and plus-decoded; 400 on bad UTF-8."""
        out: dict[str, str] = {}
        if not self.query:
            return out
        for part in self.query.split("&"):
            if not part:
                continue
            name, _, value = part.partition("=")
            try:
                name = unquote_plus(name, errors="strict")
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError:
                raise HttpError(400, "query string is not valid UTF-8") from None
            out.setdefault(name, value)
        return out


def bare_line_end(head: bytes | bytearray) -> bool:
    """``head`` (a request head so far, without its final blank line) has a line ended by a
    bare LF or a bare CR. Such a head never ends in CRLF CRLF, so without this check the
    connection would wait for the idle timeout instead of answering 400."""
    if head.endswith(b"\r"):
        head = head[:-1]  # its LF may be in the next packet
    crlf = head.count(b"\r\n")
    return head.count(b"\n") != crlf or head.count(b"\r") != crlf


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers (without the final blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "malformed request line", close=True)
    method_b, target_b, version = parts
    # A line that is not a request line at all is the client's error (400); 505 is only for a
    # well-formed request in an HTTP version ringcast does not speak.
    if (
        not _TOKEN.fullmatch(method_b)
        or not target_b.startswith(b"/")
        or _TARGET_CTL.search(target_b)
        or not _VERSION.fullmatch(version)
    ):
        raise HttpError(400, "malformed request line", close=True)
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported", close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name_b, sep, value_b = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name_b):
            raise HttpError(400, "malformed header line", close=True)
        name = name_b.decode("ascii").lower()
        value = value_b.strip(b" \t").decode("latin-1")
        if _CTL.search(value):
            raise HttpError(400, f"control character in the value of header {name!r}", close=True)
        if name in headers:
            if name == "content-length" and headers[name] != value:
                raise HttpError(400, "conflicting Content-Length headers", close=True)
            if name != "content-length":
                headers[name] = headers[name] + ", " + value
        else:
            headers[name] = value
    try:
        # Raw non-ASCII bytes in a target are UTF-8 (what curl and browsers send for a path
        # typed as ``/v1/stream/café``), as are its percent-escapes.
        target = target_b.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "request target is not valid UTF-8", close=True) from None
    path, _, query = target.partition("?")
    req = Request(method_b.decode("ascii"), path, query, version, headers)
    req.target = target_b
    return req


def body_length(req: Request, max_body: int | None) -> int:
    """The length of ``req``'s body from its ``Content-Length`` (0 without one); 411 for a
    chunked body, 400 for a malformed length, 413 above ``max_body`` (None: no limit, for a
    body that is streamed, not held)."""
    if "transfer-encoding" in req.headers:
        raise HttpError(
            411, "chunked request bodies are not supported; send Content-Length", close=True
        )
    cl = req.headers.get("content-length")
    if cl is None:
        return 0
    if not _DECIMAL.fullmatch(cl):
        raise HttpError(400, f"invalid Content-Length {cl[:32]!r}", close=True)
    n = int(cl)
    if max_body is not None and n > max_body:
        raise HttpError(
            413,
            f"request body of {n} bytes exceeds the limit of {max_body} bytes",
            close=True,
        )
    return n


def parse_offset(value: str, what: str) -> int:
    """A byte offset from a query parameter or header (``""`` is 0); 400 if malformed."""
    if value == "":
        return 0
    if not _DECIMAL.fullmatch(value):
        raise HttpError(
            400, f"invalid {what} {value[:32]!r}: expected a non-negative decimal byte offset"
        )
    return int(value)
