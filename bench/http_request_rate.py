"""Request parsing cost of ``ringcast serve``: ``wrk`` sends small requests on keep-alive
connections as fast as the server answers them, and the HTTP process's CPU time per request
is read from ``/proc`` (psutil) around each run. The requests are the ones parsing matters
for: ``GET /health`` (a head, no body), a ``Content-Length`` JSON body to
``/v1/streams/lookup``, and (``--chunked``) the same body chunked.

    python bench/http_request_rate.py                      # 3 runs of 10 s per request
    python bench/http_request_rate.py --ab /other/checkout/python    # A/B against a tree

Needs ``wrk`` (``apt install wrk``). One HTTP process, so its CPU is the parser's and the
routes'; the rate is bounded by a 2-core machine shared with wrk, the CPU per request is the
figure to compare. Results in bench/RESULTS.md ("Request parsing").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import psutil
from serve_process import ServeProcess

BODY = b'{"conversation_ids": ["bench-a", "bench-b"]}'


def wrk_script(chunked: bool) -> str:
    """A wrk Lua script sending the lookup request (with a body) on every call."""
    if chunked:
        half = len(BODY) // 2
        body = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            BODY[:half],
            len(BODY) - half,
            BODY[half:],
        )
        raw = (
            b"POST /v1/streams/lookup HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body
        )
        lua_raw = raw.decode().replace("\r", "\\r").replace("\n", "\\n").replace('"', '\\"')
        return f'request = function() return "{lua_raw}" end\n'
    lua_body = BODY.decode().replace('"', '\\"')
    return (
        'wrk.method = "POST"\n'
        f'wrk.body = "{lua_body}"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )


def run(
    port: int, http_pid: int, path: str, script: str | None, secs: int, conns: int
) -> tuple[float, float]:
    """(requests per second, HTTP-process CPU µs per request) of one wrk run."""
    proc = psutil.Process(http_pid)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s"]
    if script is not None:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    before = proc.cpu_times()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = proc.cpu_times()
    m = re.search(r"(\d+) requests in ([\d.]+)s", out)
    assert m, out
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw error answers:\n{out}")
    n, took = int(m.group(1)), float(m.group(2))
    cpu = (after.user - before.user) + (after.system - before.system)
    return n / took, cpu / n * 1e6


def serve(pythonpath: str | None) -> tuple[ServeProcess, int]:
    """A server with one HTTP process (from the tree at ``pythonpath``, if given) and that
    process's pid."""
    saved = os.environ.get("PYTHONPATH")
    if pythonpath is not None:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        srv = ServeProcess("--http-procs", "1", "--workers", "1", "--max-sessions", "256")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    (http_pid,) = srv.pids("http")
    return srv, http_pid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--secs", type=int, default=10, help="seconds per wrk run (10)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per request kind (3)")
    ap.add_argument("--conns", type=int, default=16, help="keep-alive connections (16)")
    ap.add_argument("--chunked", action="store_true", help="also a chunked request body")
    ap.add_argument(
        "--ab",
        metavar="PYTHONPATH",
        help="also a server from the tree at PYTHONPATH (its python/ directory), both up at "
        "once and their runs alternating, so that both see the same machine load",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("http_request_rate: needs wrk on PATH (apt install wrk)")
    servers: list[tuple[str, ServeProcess, int]] = []
    tmp = tempfile.mkdtemp(prefix="ringcast-wrk-")
    try:
        if args.ab is not None:
            servers.append(("other", *serve(args.ab)))
        servers.append(("this", *serve(None)))
        kinds: list[tuple[str, str, str | None]] = [("GET /health", "/health", None)]
        for chunked in (False, True) if args.chunked else (False,):
            script = os.path.join(tmp, f"lookup-{chunked}.lua")
            with open(script, "w") as f:
                f.write(wrk_script(chunked))
            name = "POST lookup, " + ("chunked" if chunked else "Content-Length")
            kinds.append((name, "/v1/streams/lookup", script))
        print(f"{'tree':<6} {'request':<34} {'req/s':>9} {'CPU µs/req':>11}")
        for name, path, script in kinds:
            for _ in range(args.repeat):
                for tree, srv, http_pid in servers:
                    if script is not None and "chunked" in name and tree == "other":
                        continue  # (a tree from before chunked bodies answers 411)
                    rate, cpu = run(srv.port, http_pid, path, script, args.secs, args.conns)
                    print(f"{tree:<6} {name:<34} {rate:9.0f} {cpu:11.1f}", flush=True)
    finally:
        for _, srv, _ in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
