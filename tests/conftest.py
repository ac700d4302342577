"""Fixtures shared by every test directory: private Redis servers for the cluster tests, a
standalone ``redis-server`` (``redis_server``) and a 3-master Redis Cluster
(``redis_cluster``) on loopback ports, started in the tests' own directories and killed after
(a Redis the machine already runs is never touched). Tests that use them are skipped where
``redis-server`` is not installed. And ``small_shm``, a 2 MiB tmpfs for the tests of a full
shared-memory filesystem (core and server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _need_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(port: int, *args: str, check: bool = True) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {out.stderr or out.stdout}")
    return out.stdout.strip()


class RedisServer:
    """One ``redis-server`` process on a free loopback port, without persistence (a restart
    comes back empty, the harder case for the mirror)."""

    def __init__(self, workdir: Path, *extra: str, port: int | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                "redis.log",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while cli(self.port, "PING", check=False) != "PONG":
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} did not start")
                time.sleep(0.02)
        except BaseException:  # not left running by a failed start, a timeout or a Ctrl-C
            self.kill()
            raise

    def cli(self, *args: str) -> str:
        return cli(self.port, *args)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()


class RedisClusterNodes:
    """Three ``redis-server --cluster-enabled yes`` masters joined by
    ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        self.servers: list[RedisServer] = []
        try:
            self._create(workdir)
        except BaseException:  # the servers started so far are not left running
            self.kill()
            raise

    def _create(self, workdir: Path) -> None:
        for i in range(3):
            port = free_port()
            self.servers.append(
                RedisServer(
                    workdir / f"node{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-port",  # the default, port + 10000, may not exist
                    str(free_port()),
                    "--cluster-node-timeout",
                    "2000",
                    port=port,
                )
            )
        addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
        cli(self.servers[0].port, "--cluster", "create", *addrs, "--cluster-yes")
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in cli(s.port, "CLUSTER", "INFO") for s in self.servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @property
    def seeds(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def kill(self) -> None:
        for s in self.servers:
            s.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    _need_redis()
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    _need_redis()
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield nodes
    finally:
        nodes.kill()


@pytest.fixture
def small_shm(tmpfs: Callable[[str], Path]) -> Path:
    """A fresh 2 MiB tmpfs (a shared-memory filesystem much smaller than a segment), unmounted
    after the test; skips the test where mounting needs a root this process is not."""
    return tmpfs("2m")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)``: a fresh tmpfs of ``size`` (mount's syntax: ``2m``, ``3g``), unmounted
    after the test; skips the test where mounting needs a root this process is not."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounts a tmpfs: needs root")
        mnt = tmp_path / f"shm-{len(mounted)}"
        mnt.mkdir()
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
