"""The fake OpenAI-compatible upstream of the record/replay tests, as a process of its own
(``python fake_upstream.py CAPTURE``, started by the ``fake_upstream`` fixture): a module and
not a fixture because it runs as a script. For each streaming POST it finds the captured
stream whose request has the same messages and writes its events, one HTTP chunk each, at
their captured times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from ringcast.http.parse import HeadParser


def load_capture(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _serve_capture(capture: Path) -> None:
    streams = load_capture(capture)
    by_messages = {json.dumps(s["request"]["messages"], sort_keys=True): s for s in streams}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            t0 = asyncio.get_running_loop().time()
            parser = HeadParser()
            parser.feed(bytearray(head))
            assert parser.request is not None
            length = parser.request.content_length
            body = json.loads(await reader.readexactly(length)) if length else {}
            s = by_messages.get(json.dumps(body.get("messages"), sort_keys=True))
            if s is None:
                msg = b'{"error":{"code":404,"message":"no such captured request"}}'
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg)
                )
                return
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            loop = asyncio.get_running_loop()
            for ev in s["events"]:
                delay = t0 + ev["t"] - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                data = ev["data"].encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"fake upstream listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_capture(Path(sys.argv[1])))
