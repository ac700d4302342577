"""Wire types: what crosses a process boundary, each defined once.

- :mod:`ringcast.wire.openai`: OpenAI request bodies, streamed chunks, responses, error bodies
  and the stream-registry answers (``msgspec`` structs, encoders and decoders made once);
- :mod:`ringcast.wire.sse`: SSE framing (the ``id: <offset>`` line), splitting and the
  terminal events;
- :mod:`ringcast.wire.jobs`: the job frame an HTTP process hands to a worker.

Depends only on the library (``ringcast``); everything above (HTTP, server, replay) uses it.
"""
