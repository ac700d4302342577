"""docs/RECIPES.md, run as written: the openai SDK with a resume over its HTTP client, the
browser page that survives a reload (in Chromium), the 20-line ``--generator`` plug-in."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pages import PageServer, serving

pytestmark = pytest.mark.timeout(120)

RECIPES = (Path(__file__).resolve().parents[2] / "docs" / "RECIPES.md").read_text()


def recipe(title: str, lang: str) -> str:
    start = RECIPES.index(f"## {title}")
    (block,) = re.findall(rf"```{lang}\n(.*?)```", RECIPES[start:].split("\n## ")[0], re.S)
    return block


def content_of(body: bytes) -> str:
    """The answer's text, from a whole stream's bytes."""
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


class CuttingProxy(socketserver.ThreadingTCPServer):
    """A TCP relay to ringcast that cuts each of its first ``cuts`` connections after
    ``after`` bytes of response, as a flaky network would."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        backend_port: int,
        cuts: int,
        after: int,
        before_cut: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(("127.0.0.1", 0), CuttingHandler)
        self.backend_port = backend_port
        self.cuts = cuts
        self.after = after
        self.before_cut = before_cut
        """Called at each cut, before the client sees it."""
        self.requests: list[bytes] = []
        self.lock = threading.Lock()


class CuttingHandler(socketserver.BaseRequestHandler):
    server: CuttingProxy

    def handle(self) -> None:
        client: socket.socket = self.request
        with self.server.lock:
            cut = len(self.server.requests) < self.server.cuts
            self.server.requests.append(b"")
            index = len(self.server.requests) - 1
        back = socket.create_connection(("127.0.0.1", self.server.backend_port))

        def upstream() -> None:
            try:
                while data := client.recv(65536):
                    if not self.server.requests[index]:
                        self.server.requests[index] = data.split(b"\r\n", 1)[0]
                    back.sendall(data)
            except OSError:
                pass

        threading.Thread(target=upstream, daemon=True).start()
        sent = 0
        try:
            while data := back.recv(65536):
                if cut and sent + len(data) > self.server.after:
                    client.sendall(data[: self.server.after - sent])
                    if self.server.before_cut is not None:
                        self.server.before_cut()
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            back.close()


@contextlib.contextmanager
def cutting(
    port: int, cuts: int, after: int, before_cut: Callable[[], None] | None = None
) -> Iterator[CuttingProxy]:
    """A :class:`CuttingProxy` to ringcast on ``port``, serving until the block ends."""
    proxy = CuttingProxy(port, cuts, after, before_cut)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def recipe_namespace() -> dict[str, Any]:
    """The openai recipe's definitions (``chat_with_resume``, ``StreamEnded``)."""
    pytest.importorskip("openai")
    namespace: dict[str, Any] = {}
    exec(recipe("Resume with the `openai` SDK", "python"), namespace)
    return namespace


@pytest.fixture
def srv(serve: Any) -> Iterator[Any]:
    with serve("--tokens-per-s", "100", http_procs=1) as s:
        yield s


def test_openai_sdk_with_resume(srv: Any) -> None:
    namespace = recipe_namespace()
    with cutting(srv.port, cuts=2, after=1500) as proxy:
        text = namespace["chat_with_resume"](
            f"http://127.0.0.1:{proxy.server_address[1]}",
            "recipe-sdk",
            [{"role": "user", "content": "a story"}],
        )
    _, _, whole = srv.request("GET", "/v1/stream?conv_id=recipe-sdk")
    assert text == content_of(whole) and len(text) > 20
    # The POST was cut, then the first resume; the second resume finished it.
    lines = proxy.requests
    assert lines[0].startswith(b"POST /v1/chat/completions")
    resumes = [int(m.group(1)) for ln in lines[1:] if (m := re.search(rb"from=(\d+)", ln))]
    assert len(resumes) >= 2 and 0 < resumes[0] < resumes[1] < len(whole)


def test_openai_sdk_recipe_stops_at_an_error_event(serve: Any) -> None:
    """An error event in the stream (here a DELETE's) ends the recipe's loop with
    ``StreamEnded`` and the event's error, not a parse error of the SDK's chunk type."""
    namespace = recipe_namespace()
    with serve("--tokens-per-s", "10", http_procs=1) as s:  # 64 tokens: 6.4 s
        delete = threading.Timer(
            0.5, lambda: s.request("DELETE", "/v1/stream?conv_id=recipe-deleted")
        )
        delete.start()
        try:
            with pytest.raises(namespace["StreamEnded"]) as ended:
                namespace["chat_with_resume"](
                    f"http://127.0.0.1:{s.port}",
                    "recipe-deleted",
                    [{"role": "user", "content": "a long story"}],
                )
        finally:
            delete.join()
    assert ended.value.args[0]["type"] == "cancelled"


def test_openai_sdk_recipe_does_not_resume_into_a_newer_stream(srv: Any) -> None:
    """The POST is cut, and a newer request with the same id replaces its stream before the
    resume: the recipe's resume names its generation, so it ends with ``replaced`` instead
    of taking the newer stream's bytes from that offset on."""
    namespace = recipe_namespace()

    def replace() -> None:
        srv.post_chat("recipe-replaced", max_tokens=5, prompt="another").read_all_and_close()

    with (
        cutting(srv.port, cuts=1, after=1500, before_cut=replace) as proxy,
        pytest.raises(namespace["StreamEnded"]) as ended,
    ):
        namespace["chat_with_resume"](
            f"http://127.0.0.1:{proxy.server_address[1]}",
            "recipe-replaced",
            [{"role": "user", "content": "a story"}],
        )
    assert ended.value.args[0]["type"] == "replaced"
    assert re.search(rb"generation=[0-9]+\.[0-9]+\.[0-9]+", proxy.requests[-1])


PAGE_HOOK = """<script>
// The test's part: reload the page once, mid-stream; report when the recipe shows "done".
const hook = setInterval(() => {
  if (!saved) return;  // the recipe is still starting the stream
  if (!sessionStorage.getItem("reloaded-at") && saved.offset > 0) {
    sessionStorage.setItem("reloaded-at", String(saved.offset));
    location.reload();
  } else if (status.textContent === "done") {
    clearInterval(hook);
    fetch("/report", {method: "POST", body: JSON.stringify(
      {conv: saved.conv, text: saved.text, reloadedAt: sessionStorage.getItem("reloaded-at")})});
  }
}, 20);
</script>"""


def test_browser_page_resumes_after_reload(serve: Any, chromium: Any) -> None:
    html = recipe("A browser page that resumes after a reload", "html")
    pages = PageServer()
    origin = pages.url
    with serving(pages):
        with serve("--cors-origin", origin, "--tokens-per-s", "20", http_procs=1) as s:
            assert 'const RINGCAST = "http://localhost:8080";' in html
            page = html.replace("http://localhost:8080", f"http://127.0.0.1:{s.port}")
            pages.page = (page + PAGE_HOOK).encode()
            with chromium(origin + "/"):
                assert pages.reported.wait(90), "the page never finished"
            report = pages.report
            assert report is not None
            _, _, whole = s.request("GET", f"/v1/stream?conv_id={report['conv']}")
    assert pages.loads == 2  # loaded, reloaded mid-stream
    assert 0 < int(report["reloadedAt"]) < len(whole)
    # Every piece exactly once across the reload.
    assert report["text"] == content_of(whole) and report["text"]


def test_generator_plugin_in_20_lines(
    tmp_path: Path, serve: Any, sse_events: Any, data_of: Any
) -> None:
    code = recipe("A `--generator` plug-in in 20 lines", "python")
    assert len(code.strip().splitlines()) <= 20
    (tmp_path / "slow_echo.py").write_text(code)
    with serve(
        "--generator", "slow_echo:generate", http_procs=1, env={"PYTHONPATH": str(tmp_path)}
    ) as s:
        body = s.post_chat("plug-1", max_tokens=2, prompt="one two three").read_all_and_close()
        assert content_of(body) == "one two "
        final = json.loads(data_of(sse_events(body)[-2]))
        assert final["choices"][0]["finish_reason"] == "length"
        body = s.post_chat("plug-2", max_tokens=10, prompt="one two three").read_all_and_close()
        assert content_of(body) == "one two three "
        assert json.loads(data_of(sse_events(body)[-2]))["choices"][0]["finish_reason"] == "stop"
        # Resumable like any stream.
        _, _, again = s.request("GET", "/v1/stream?conv_id=plug-2&from=100")
        assert again == body[100:]
