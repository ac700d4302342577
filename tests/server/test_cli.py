"""``ringcast serve`` command line: help, refusals with a clear message."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)


def ringcast(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringcast.cli", *args],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_itself() -> None:
    top = ringcast("--help")
    assert top.returncode == 0
    assert "serve" in top.stdout
    out = ringcast("serve", "--help")
    assert out.returncode == 0
    for flag in (
        "--http-procs",
        "--workers",
        "--upstream",
        "--upstream-ca-file",
        "--api-key",
        "--ttl",
        "--idle-timeout",
        "--evict-running",
        "--keep-segment",
        "--write-timeout",
        "--event-loop",
        "Last-Event-ID",
    ):
        assert flag in out.stdout, flag
    assert "(default: 8080)" in out.stdout  # llama-server's default port


def test_no_command_prints_help() -> None:
    out = ringcast()
    assert out.returncode == 2
    assert "serve" in out.stdout


def test_bad_values_are_refused(tmp_path: Path) -> None:
    out = ringcast("serve", "--port", "0", "--workers", "-1", cwd=tmp_path)
    assert out.returncode == 2
    assert "--workers must be >= 0" in out.stderr
    out = ringcast("serve", "--port", "0", "--api-key-file", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "api-key-file" in out.stderr
    out = ringcast("serve", "--port", "0", "--api-key", "k1", "--api-key", " ", cwd=tmp_path)
    assert out.returncode == 2
    assert "--api-key is empty" in out.stderr
    comments = tmp_path / "keys.txt"
    comments.write_text("# no keys yet\n\n")
    out = ringcast("serve", "--port", "0", "--api-key-file", str(comments), cwd=tmp_path)
    assert out.returncode == 2
    assert "holds no key" in out.stderr
    out = ringcast("serve", "--port", "0", cwd=tmp_path, env={"RINGCAST_API_KEY": ""})
    assert out.returncode == 2
    assert "$RINGCAST_API_KEY is set but empty" in out.stderr
    out = ringcast("serve", "--port", "0", "--speed", "2", cwd=tmp_path)
    assert out.returncode == 2
    assert "--speed only applies with --replay" in out.stderr
    for opt, bad in [("--ttl", "-1"), ("--tokens-per-s", "-5"), ("--idle-timeout", "nan"),
                     ("--prefill-s", "-0.5"), ("--sse-ping-interval", "-1"), ("--ttl", "inf"),
                     ("--idle-timeout", "inf"), ("--sse-ping-interval", "inf")]:  # fmt: skip
        out = ringcast("serve", "--port", "0", opt, bad, cwd=tmp_path)
        assert out.returncode == 2, (opt, bad)
        assert f"{opt} must be a finite number >= 0 (got {float(bad)})" in out.stderr
    out = ringcast("serve", "--port", "0", "--session-bytes", "10", cwd=tmp_path)
    assert out.returncode == 2  # every stream's reader got 410 at once
    assert "--session-bytes 10 is too small: a stream's ring must hold at least 4096" in out.stderr
    for bad in ("0", "1023"):
        out = ringcast("serve", "--port", "0", "--max-body", bad, cwd=tmp_path)
        assert out.returncode == 2  # every POST was refused with 413
        assert f"--max-body {bad} is too small: give at least 1024 bytes" in out.stderr
    for bad in ("99999", "-5", "x"):
        out = ringcast("serve", "--port", bad, cwd=tmp_path)
        assert out.returncode == 2, bad
        assert "ringcast serve: error: argument --port:" in out.stderr, out.stderr
        assert "give a whole number from 0 to 65535" in out.stderr
        assert "Traceback" not in out.stderr
    out = ringcast("serve", "--port", "0", "--max-id-len", "10", cwd=tmp_path)
    assert out.returncode == 2
    assert "argument --max-id-len: '10' is not a conversation id length" in out.stderr
    out = ringcast("serve", "--port", "0", "--bogus", cwd=tmp_path)
    assert out.returncode == 2
    # Said by the subcommand, in two lines: the error, and where its options are (not the
    # 25 lines of its usage before them, nor the top level's).
    assert out.stderr.splitlines() == [
        "ringcast serve: error: unrecognized arguments: --bogus",
        "Run 'ringcast serve --help' for its options.",
    ]
    out = ringcast("serve", "--port", "0", "--host", "nosuchhost.invalid", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot listen on --host nosuchhost.invalid" in out.stderr
    assert "--port" not in out.stderr  # the host is the problem, not the port
    for bad in ("0", "-1", "nan", "inf"):
        out = ringcast("serve", "--port", "0", "--write-timeout", bad, cwd=tmp_path)
        assert out.returncode == 2, bad
        assert f"--write-timeout must be a number of seconds > 0 (got {float(bad)})" in out.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # Past what a segment holds: an OverflowError's traceback where it was made.
        (["--session-bytes", "99999999999999999999"], "--session-bytes must be at most 1TiB"),
        (["--max-sessions", "1048577"], "--max-sessions must be at most 1048576"),
        (["--max-sessions-per-key", "10" * 10], "--max-sessions-per-key must be at most"),
        # NaN in the children's JSON configuration stopped them with a traceback.
        (["--mirror-ms", "nan"], "--mirror-ms must be between 1 and 1000 (got nan)"),
        # Acted as 0 without a word.
        (["--default-max-tokens", "-1"], "--default-max-tokens must be at least 1 (got -1)"),
    ],
)
def test_numbers_past_what_the_server_holds_are_refused_in_one_line(
    tmp_path: Path, args: list[str], said: str
) -> None:
    out = ringcast("serve", "--port", "0", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(f"ringcast serve: {said}"), out.stderr
    assert "Traceback" not in out.stderr


def test_times_out_of_range_and_bytes_that_are_not_utf8_are_refused(tmp_path: Path) -> None:
    """A ``--ttl`` whose Redis expiry cannot be set (1e16 failed every sync of the mirror), a
    long-poll wait that is not a number of seconds in range, and an argument with bytes that
    are not UTF-8 (a traceback before) are refused before anything starts."""
    for opt, bad, most in [("--ttl", "1e16", "315360000 seconds (10 years"),
                           ("--idle-timeout", "1e300", "315360000 seconds (10 years"),
                           ("--prefill-s", "1e300", "3600 seconds (an hour"),
                           ("--sse-ping-interval", "3601", "3600 seconds (an hour")]:  # fmt: skip
        out = ringcast("serve", "--port", "0", opt, bad, cwd=tmp_path)
        assert out.returncode == 2, (opt, bad)
        assert f"{opt} must be at most {most}; got {float(bad):g})" in out.stderr, out.stderr
    for bad in ("inf", "nan", "-5", "0", "3601"):
        out = ringcast("serve", "--port", "0", "--ds-long-poll-timeout", bad, cwd=tmp_path)
        assert out.returncode == 2, bad
        assert "--ds-long-poll-timeout must be a number of seconds > 0 and at most 3600" in (
            out.stderr
        ), out.stderr
    for opt in ("--model-name", "--node-id", "--api-key"):
        argv = [sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", opt]
        out = subprocess.run(
            [*map(os.fsencode, argv), b"model-\xff"], capture_output=True, timeout=50, cwd=tmp_path
        )
        err = out.stderr.decode()
        assert out.returncode == 2, err
        assert f"{opt}: the value has bytes that are not UTF-8; give it in UTF-8" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ("--upstream", "http://127.0.0.1:8080"),  # the default port is llama-server's
        ("--upstream", "http://localhost:8080/v1"),
        ("--port", "9123", "--upstream", "http://127.0.0.1:9123"),
        ("--host", "0.0.0.0", "--port", "9123", "--upstream", "http://127.0.0.1:9123"),
        ("--host", "::", "--port", "9123", "--upstream", "https://localhost:9123"),
    ],
)
def test_upstream_at_its_own_address_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = ringcast("serve", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "is this server's own address" in out.stderr
    assert "Traceback" not in out.stderr


def test_event_loop_reaches_every_child(tmp_path: Path, serve) -> None:
    with serve("--event-loop", "asyncio", "--tokens-per-s", "0", workers=2) as s:
        for role, index in (("http", 0), ("http", 1), ("worker", 0), ("worker", 1)):
            labels = f'role="{role}",index="{index}"'
            assert s.metric(f'event_loop_info{{{labels},loop="asyncio"}}') == 1, labels
        assert s.metric("event_loop_info") == 4  # and no other line
        body = s.post_chat("on-asyncio", max_tokens=3).read_all_and_close()
        assert body.endswith(b"data: [DONE]\n\n")


def test_segment_of_other_sizes_is_refused_not_replaced(tmp_path: Path, serve) -> None:
    s = serve.start("--max-sessions", "16", "--keep-segment")
    assert s.stop() == 0
    before = s.segment.read_bytes()[:4096]
    out = ringcast("serve", "--port", "0", "--segment", str(s.segment), "--max-sessions", "32")
    assert out.returncode == 2
    assert str(s.segment) in out.stderr
    assert s.segment.read_bytes()[:4096] == before
    s.segment.unlink()


def test_a_dangling_symbolic_link_at_the_segment_path_is_refused(tmp_path: Path) -> None:
    # It used to recurse in open_or_create until the stack overflowed (exit 139).
    link = tmp_path / "seg"
    link.symlink_to(tmp_path / "nowhere")
    out = ringcast("serve", "--port", "0", "--segment", str(link))
    assert out.returncode == 2, out.stderr
    assert "symbolic link" in out.stderr and str(link) in out.stderr
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_key_on_the_command_line_is_warned_about(
    serve: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    # Every local user can read it in /proc/<pid>/cmdline.
    with serve("--api-key", "sesame", "--upstream-api-key", "upstream-secret"):
        pass
    err = capfd.readouterr().err
    for flag, safe in (
        ("--api-key", "$RINGCAST_API_KEY"),
        ("--upstream-api-key", "$RINGCAST_UPSTREAM_KEY"),
    ):
        assert f"warning: {flag} on the command line is readable by every local user" in err
        assert safe in err
    assert "sesame" not in err and "upstream-secret" not in err
    with serve(env={"RINGCAST_API_KEY": "sesame"}):
        pass
    assert "warning" not in capfd.readouterr().err


def test_a_redis_password_on_the_command_line_is_warned_about(
    serve: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    # The server starts without its Redis reachable; the warning comes before.
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with serve("--redis", f"redis://:hunter2@127.0.0.1:{port}/0"):
        pass
    err = capfd.readouterr().err
    assert "warning: a password in --redis on the command line is readable" in err
    assert "$RINGCAST_REDIS_URL" in err and "hunter2" not in err
    with serve("--redis", f"redis://127.0.0.1:{port}/0"):
        pass
    assert "warning" not in capfd.readouterr().err


def test_busy_port_is_refused(tmp_path: Path, serve) -> None:
    s = serve.start()
    try:
        out = ringcast("serve", "--port", str(s.port), "--segment", str(tmp_path / "other"))
        assert out.returncode == 2
        assert "cannot bind" in out.stderr
    finally:
        s.stop()


def test_segment_in_use_by_a_live_server_is_refused(tmp_path: Path, serve) -> None:
    s = serve.start()
    try:
        out = ringcast("serve", "--port", "0", "--segment", str(s.segment))
        assert out.returncode == 2
        assert "in use" in out.stderr
        assert s.segment.exists()
    finally:
        s.stop()


def test_a_bad_spread_is_refused_with_the_choices() -> None:
    out = ringcast("serve", "--spread", "some")
    assert out.returncode == 2
    assert "invalid choice: 'some' (choose from 'adaptive', 'all')" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--upstream", "ftp://127.0.0.1:21"), "must start with http:// or https://"),
        (("--upstream", "127.0.0.1:8080"), "must start with http:// or https://"),
        (("--upstream", "http://"), "names no host"),
        (("--upstream", "http://127.0.0.1:99999"), "not a valid URL"),
        (("--upstream", "http://user:pw@127.0.0.1:8080"), "--upstream-api-key"),
        (("--upstream", "http://127.0.0.1:8080/v1?x=1"), "scheme, host, port and path only"),
        (("--upstream-ca-file", "/etc/hostname"), "only applies with an https --upstream"),
        (
            ("--upstream", "http://127.0.0.1:8080", "--upstream-ca-file", "/etc/hostname"),
            "only applies with an https --upstream",
        ),
        (
            ("--upstream", "https://127.0.0.1:8443", "--upstream-ca-file", "/nonexistent.pem"),
            "cannot load CA certificates",
        ),
        (
            ("--upstream", "https://127.0.0.1:8443", "--upstream-ca-file", "/etc/hostname"),
            "cannot load CA certificates",
        ),
        (
            ("--upstream", "http://127.0.0.1:8080", "--generator", "ringcast.worker:x"),
            "give one",
        ),
    ],
)
def test_bad_upstream_is_refused_at_start(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    out = ringcast("serve", "--port", "0", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_http_procs_auto_is_one_per_core_left_by_the_workers() -> None:
    from ringcast.server.config import AUTO_HTTP_PROCS_MAX, auto_http_procs

    cases = {
        (1, 1): 1, (2, 1): 1, (2, 2): 1, (4, 1): 3, (8, 2): 6, (16, 1): 15, (2, 3): 1,
        (1, 0): 1, (2, 0): 2, (8, 0): 8,  # no workers: every core (--spread adaptive)
    }  # fmt: skip
    for (cores, workers), want in cases.items():
        assert auto_http_procs(cores, workers) == want, (cores, workers)
    assert auto_http_procs(256, 1) == AUTO_HTTP_PROCS_MAX


def test_usable_cores_follow_the_affinity_mask_and_help_says_what_auto_is() -> None:
    from ringcast.server.config import auto_http_procs, default_mirror_procs, usable_cores

    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from ringcast.server.config import usable_cores; print(usable_cores())"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert pinned.stdout.strip() == "1"
    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    out = " ".join(ringcast("serve", "--help").stdout.split())
    word = "core" if cores == 1 else "cores"
    assert f"here {cores} {word}, so auto is {auto_http_procs(cores, 0)} with --workers 0" in out
    assert f"here {cores} {word}, so 0 runs {default_mirror_procs(cores)}" in out
    pinned_help = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-m", "ringcast.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "here 1 core, so auto is 1 with --workers 0" in " ".join(pinned_help.stdout.split())
    assert "here 1 core, so 0 runs 1" in " ".join(pinned_help.stdout.split())


@pytest.mark.parametrize("given", [None, "auto", "AUTO"])
def test_default_http_procs_are_auto(serve: Any, given: str | None) -> None:
    import psutil
    from ringcast.server.config import auto_http_procs, usable_cores

    with serve("--tokens-per-s", "0", http_procs=given, workers=1) as s:
        children = psutil.Process(s.proc.pid).children()
        http = [c for c in children if "ringcast.server.http_process" in c.cmdline()]
        assert len(http) == auto_http_procs(usable_cores(), 1)
        body = s.post_chat("auto", max_tokens=3).read_all_and_close()
        assert body.endswith(b"data: [DONE]\n\n")


def test_bad_http_procs_are_refused(tmp_path: Path) -> None:
    for bad in ("0", "-1", "two", ""):
        out = ringcast("serve", "--port", "0", "--http-procs", bad, cwd=tmp_path)
        assert out.returncode == 2, bad
        assert "--http-procs" in out.stderr and "give auto or a whole number >= 1" in out.stderr


def test_more_processes_than_the_segment_has_rows_are_refused(tmp_path: Path) -> None:
    """70 HTTP processes cannot all attach to a segment of 64 process rows: refused before
    anything starts, with the count and the flags to lower (it used to start, lose children
    and stop with "children failed to start")."""
    out = ringcast("serve", "--port", "0", "--http-procs", "70", cwd=tmp_path)
    assert out.returncode == 2
    assert "1 manager + 70 HTTP processes make 71" in out.stderr
    assert "lower --http-procs or --workers" in out.stderr
    out = ringcast("serve", "--port", "0", "--workers", "40", "--http-procs", "20", cwd=tmp_path)
    assert out.returncode == 2 and "make 61" in out.stderr
    out = ringcast("serve", "--port", "0", "--mirror-procs", "-1", cwd=tmp_path)
    assert out.returncode == 2 and "--mirror-procs must be >= 0" in out.stderr


def test_cgroup_cpu_quota_caps_the_cores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ringcast.server import config

    root = tmp_path / "cgroup"
    monkeypatch.setattr(config, "CGROUP_ROOT", str(root))
    proc = tmp_path / "proc-self-cgroup"
    # v2: the tightest quota of the cgroup and its ancestors counts; "max" is none.
    (root / "kube" / "pod" / "box").mkdir(parents=True)
    (root / "kube" / "cpu.max").write_text("250000 100000\n")
    (root / "kube" / "pod" / "cpu.max").write_text("max 100000\n")
    (root / "kube" / "pod" / "box" / "cpu.max").write_text("400000 100000\n")
    proc.write_text("0::/kube/pod/box\n")
    assert config.cgroup_cpu_limit(str(proc)) == 2.5
    (root / "kube" / "cpu.max").write_text("max 100000\n")
    assert config.cgroup_cpu_limit(str(proc)) == 4.0
    # v1 (a hybrid host): the cpu controller's cfs quota; -1 is none.
    v1 = root / "cpu,cpuacct" / "docker" / "c1"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker/c1\n2:cpu,cpuacct:/docker/c1\n0::/\n")
    assert config.cgroup_cpu_limit(str(proc)) == 0.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert config.cgroup_cpu_limit(str(proc)) is None
    assert config.cgroup_cpu_limit(str(tmp_path / "no-such-file")) is None


def test_malformed_or_non_ascii_cgroup_files_never_stop_a_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cgroup named outside ASCII (its bytes are in /proc/self/cgroup as they are) had
    ``--http-procs auto``, the default, raise UnicodeDecodeError at start; a cpu.max with a
    zero period raised ZeroDivisionError. Now the name is followed, a nonsense quota is none."""
    from ringcast.server import config

    root = tmp_path / "cgroup"
    monkeypatch.setattr(config, "CGROUP_ROOT", str(root))
    proc = tmp_path / "proc-self-cgroup"
    box = os.fsencode(root) + b"/caf\xc3\xa9/\xff"
    os.makedirs(box)
    with open(box + b"/cpu.max", "w") as f:
        f.write("150000 100000\n")
    proc.write_bytes(b"0::/caf\xc3\xa9/\xff\n")
    assert config.cgroup_cpu_limit(str(proc)) == 1.5
    for bad in ("100000 0", "0 100000", "-5 100000", "1 2 3", "\xff", ""):
        with open(box + b"/cpu.max", "w", encoding="latin-1") as f:
            f.write(bad)
        assert config.cgroup_cpu_limit(str(proc)) is None, bad


def _cpu_cgroup_dir() -> Path | None:
    """A cgroup directory under which this (root) process may make a child with a CPU
    quota: the v1 cpu hierarchy, or the v2 root with the cpu controller enabled."""
    if os.geteuid() != 0:
        return None
    for base in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (base / "cpu.cfs_period_us").exists():
            return base
    v2 = Path("/sys/fs/cgroup")
    try:
        if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2
    except OSError:
        pass
    return None


@pytest.mark.skipif(_cpu_cgroup_dir() is None, reason="needs root and a cgroup cpu controller")
def test_a_process_in_a_half_cpu_cgroup_counts_one_core() -> None:
    base = _cpu_cgroup_dir()
    assert base is not None
    group = base / f"ringcast-test-{os.getpid()}"
    group.mkdir()
    try:
        if (group / "cpu.max").exists():
            (group / "cpu.max").write_text("50000 100000\n")
        else:
            (group / "cpu.cfs_quota_us").write_text("50000\n")
        # The shell joins the group, then becomes ringcast serve --help.
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"',
             sys.executable, "-m", "ringcast.cli", "serve", "--help"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert "here 1 core, so auto is 1 with --workers 0" in " ".join(out.stdout.split())
    finally:
        group.rmdir()
