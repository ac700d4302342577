"""Record and replay: tools that drive ``ringcast serve`` from outside, as a user would.

- :mod:`ringcast.replay.record`: ``ringcast record`` (capture real streams into a trace);
- :mod:`ringcast.replay.synth`: ``ringcast trace synth|info`` (synthetic traces, summaries);
- :mod:`ringcast.replay.loadtest`: ``ringcast replay`` (starts a server as a subprocess and
  checks every reader's bytes).

The trace format and the player that ``ringcast serve --replay`` uses live one layer down, in
:mod:`ringcast.trace`, so the server never imports these tools and they never import the
server. ``generate`` is re-exported for ``--generator ringcast.replay:generate``.
"""

from ringcast.trace import generate

__all__ = ["generate"]
