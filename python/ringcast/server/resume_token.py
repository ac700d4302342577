"""Resume tokens: how a browser authenticates a resume when ``--api-key`` is set.

An ``EventSource`` cannot send headers, and an API key in a URL ends up in logs and history.
So a streaming POST made with a key is answered with ``X-Ringcast-Resume-Token``: a token
that lets ``GET /v1/stream?conv_id=ID&token=TOKEN`` read that one conversation of that key,
for ``RESUME_TOKEN_TTL`` seconds, and nothing else (no lookup, no listing, no delete, no other
conversation). It is ``<expiry>.<mac>``: the expiry in unix seconds, and an HMAC-SHA256 with
the server's secret (random per ``ringcast serve`` run, in the 0600 config: a restart
invalidates every token) over the key's digest, the conversation id and the expiry. The
token names no key: the server finds it by trying its keys' digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable

RESUME_TOKEN_TTL = 900
"""Seconds a resume token is accepted after it was issued: long enough to reload a page
and resume, short enough that a leaked URL soon opens nothing."""


def _mac(secret: str, key_digest: str, conv: str, expiry: int) -> str:
    msg = b"\n".join((key_digest.encode(), conv.encode("utf-8", "surrogatepass"), b"%d" % expiry))
    raw = hmac.new(bytes.fromhex(secret), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def issue(secret: str, key_digest: str, conv: str, now: float | None = None) -> str:
    """A token for reading ``conv`` of the key whose digest is ``key_digest``."""
    expiry = int(now if now is not None else time.time()) + RESUME_TOKEN_TTL
    return f"{expiry}.{_mac(secret, key_digest, conv, expiry)}"


def verify(
    secret: str, key_digests: Iterable[str], conv: str, token: str, now: float | None = None
) -> str | None:
    """The digest of the key ``token`` was issued to for ``conv``, or None if it is malformed,
    expired, or for another conversation or server."""
    # ASCII only: str.isdigit() accepts digits such as '²' that int() refuses, and
    # hmac.compare_digest raises on a str with non-ASCII characters (a client's input: a 500).
    if not token.isascii():
        return None
    expiry_text, dot, mac = token.partition(".")
    if not dot or not expiry_text.isdigit() or len(expiry_text) > 12:
        return None
    expiry = int(expiry_text)
    if expiry < (now if now is not None else time.time()):
        return None
    for digest in key_digests:
        if hmac.compare_digest(_mac(secret, digest, conv, expiry), mac):
            return digest
    return None
