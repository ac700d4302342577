"""Key names and the stream-id scheme, defined once.

A session (owner, conversation id) owns, in one hash slot (the ``{…}`` tag):

- ``rc:{<owner digest>:<id digest>}:m`` — a hash: owner digest, conversation id, state, end
  reason, epoch, total and first available byte, producing node and its instance, segment
  epoch, created and completed times;
- ``rc:{…}:s:<epoch>`` — a stream of the epoch's bytes. A data entry holding bytes
  ``[a, a + len)`` has id ``a-1`` and one field ``d``; a gap (bytes dropped from a ring before
  they could be mirrored) ``[a, b)`` has id ``a-1`` and field ``g`` = b; the end of the epoch is
  a marker with id ``<total>-0`` and field ``e`` = the state or end reason. So
  ``XREVRANGE s <offset>-1 - COUNT 1`` finds the entry holding any offset, and
  ``XTRIM s MINID <n>`` drops whole entries that start below byte ``n``.

Digests keep ids out of key names (an id may hold ``{``, which would break the tag, and ids are
never logged) and make the namespaces of two owners disjoint: no key of one owner can be named
from another's requests. Per owner, ``rc:o:{<owner digest>}`` is a sorted set of conversation
ids (all score 0, so ``ZRANGEBYLEX`` answers llama-server's prefix lookup). Per node,
``rc:n:{<node digest>}:lease`` (the node's liveness) and ``…:ctl`` (its control stream).
"""

from __future__ import annotations

import hashlib

PREFIX = "rc:"


def digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


class SessionKeys:
    """The keys of one session."""

    __slots__ = ("base", "meta", "owner_index", "tag", "tailed")

    def __init__(self, conversation_id: str, owner: str) -> None:
        od = digest(owner)
        self.tag = f"{od}:{digest(owner + chr(0) + conversation_id, 32)}"
        self.meta = f"{PREFIX}{{{self.tag}}}:m"
        self.base = f"{PREFIX}{{{self.tag}}}:s"
        self.tailed = f"{PREFIX}{{{self.tag}}}:t"
        """Present while some node tails the session (set with an expiry by its tails)."""
        self.owner_index = owner_index(owner)

    def stream(self, epoch: int) -> str:
        return f"{self.base}:{epoch}"


def owner_index(owner: str) -> str:
    return f"{PREFIX}o:{{{digest(owner)}}}"


def lease_key(node_id: str) -> str:
    return f"{PREFIX}n:{{{digest(node_id)}}}:lease"


def control_key(node_id: str) -> str:
    return f"{PREFIX}n:{{{digest(node_id)}}}:ctl"


def source_id(node_id: str, segment_epoch: int, slot: int, generation: int) -> str:
    """The ``src`` of a session's hash: which node's which incarnation the mirror copies
    (and which one a Durable Stream's ``ds.src`` describes)."""
    return f"{node_id}|{segment_epoch:x}|{slot}|{generation}"


def data_id(start: int) -> str:
    """Stream id of the data (or gap) entry whose first byte is at ``start``."""
    return f"{start}-1"


def entry_start(entry_id: str | bytes) -> int:
    """Byte offset an entry id stands for (its first byte, or for an end marker the total)."""
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(s.partition("-")[0])
