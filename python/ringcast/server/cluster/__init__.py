"""Streams beyond one machine: every session mirrored to Redis Streams (standalone or Redis
Cluster), readable from any node, surviving the loss of a node.

Layering: this package uses only the public library (``ringcast.Segment``, readers, session
info) and ``redis-py``; the server plugs it in behind its stream routes. Nothing here imports
the server.

- :mod:`ringcast.server.cluster.keys`: key names (hash-tagged per session) and the stream-id scheme.
- :mod:`ringcast.server.cluster.client`: connecting (URL or cluster seeds) and the Lua scripts.
- :mod:`ringcast.server.cluster.mirror`: the producing node's side: flush loop, control, lease.
- :mod:`ringcast.server.cluster.remote`: the reading node's side: lookups, reads and shared tails.

``redis`` is an optional dependency (``pip install 'ringcast[redis]'``);
:func:`ringcast.server.cluster.client.require_redis` names the extra when it is missing.
"""
