"""The job frame: what an HTTP process hands to a worker over the worker's Unix socket, and
the one-byte answer.

A frame is a 4-byte big-endian length followed by a msgpack :class:`Job`; the worker answers
``JOB_ACK_ADOPTED`` or ``JOB_ACK_GONE`` (or closes the connection without a byte: it failed).
"""

from __future__ import annotations

import struct

import msgspec


class Job(msgspec.Struct, array_like=True):
    conversation_id: str
    owner: str
    generation: int
    route: str
    """``"chat"`` or ``"completions"``."""
    body: bytes
    credentials: tuple[tuple[str, str], ...] = ()
    """The caller's key headers the upstream gets (``--upstream``), as
    :func:`ringcast.server.upstream_link.caller_credentials` chose them; empty otherwise."""


JOB_ACK_ADOPTED = b"A"
"""Worker -> HTTP process: the worker adopted the session and is now its producer."""
JOB_ACK_GONE = b"G"
"""Worker -> HTTP process: the session was gone (deleted or replaced) before adoption."""

job_encoder = msgspec.msgpack.Encoder()
job_decoder = msgspec.msgpack.Decoder(Job)
_LENGTH = struct.Struct("!I")
LENGTH_SIZE = _LENGTH.size
"""Bytes of the length prefix."""


def encode_job(job: Job) -> bytes:
    """The whole frame of ``job``: length prefix and msgpack body."""
    payload = job_encoder.encode(job)
    return _LENGTH.pack(len(payload)) + payload


def frame_length(prefix: bytes) -> int:
    """The body length a frame's ``LENGTH_SIZE``-byte prefix announces."""
    (n,) = _LENGTH.unpack(prefix)
    return int(n)


def decode_job(body: bytes) -> Job:
    """A frame's body (after the prefix); ``msgspec.DecodeError`` if it is not a job."""
    return job_decoder.decode(body)
