"""HTTP/1.1, knowing nothing of sessions.

- :mod:`ringcast.http.parse`: request heads and body lengths (the server side);
- :mod:`ringcast.http.flow`: write flow control of one connection;
- :mod:`ringcast.http.protocol`: the ``asyncio.Protocol`` of a server connection (keep-alive,
  pipelining, response framing); the application is a callable behind
  :class:`~ringcast.http.protocol.HttpApp`;
- :mod:`ringcast.http.client`: the incremental response parser and a streaming client (the
  replay tools, the worker's upstream proxy and the tests use it).
"""
