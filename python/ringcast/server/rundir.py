"""The run directory of one ``ringcast serve``: every file name in it, defined here once, and
the clean-up of directories left by a supervisor that was killed.

``<tmp>/ringcast-run-<supervisor pid>-<random>/`` holds ``config.json`` (0600: key digests,
upstream key), ``counters`` (:mod:`ringcast.server.counters`), ``worker-<i>.sock`` (each
worker's job socket), ``conns-<pid>.sock`` (each HTTP process's inbox of passed
connections, :mod:`ringcast.server.passing`), ``ready-<role>-<i>`` (a child is up),
``refused`` (a child that refused to start has said why) and ``manager.lock``.
"""

from __future__ import annotations

import fcntl
import os
import shutil

CONFIG = "config.json"
COUNTERS = "counters"
REFUSED = "refused"


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG)


def counters_path(run_dir: str) -> str:
    return os.path.join(run_dir, COUNTERS)


def first_to_refuse(run_dir: str) -> bool:
    """True for the first child of this run to call it (it creates ``refused``): of several
    children that refuse to start for the same reason (each loads the same ``--generator``),
    that one says why and the others only exit."""
    try:
        os.close(os.open(os.path.join(run_dir, REFUSED), os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no run directory to tell by: say it
    return True


_run_dir_fds: dict[str, int] = {}
"""This process's ``O_PATH`` descriptor of each run directory it names a socket in."""


def _socket_in(run_dir: str, name: str) -> str:
    """The path of socket ``name`` in the run directory, through this process's descriptor
    of the directory (``/proc/self/fd/<fd>/<name>``, opened once): a socket address holds at
    most 107 bytes, and ``TMPDIR`` may be longer. The kernel checks search permission on the
    (0700) directory as for its plain path."""
    fd = _run_dir_fds.get(run_dir)
    if fd is None:
        fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        _run_dir_fds[run_dir] = fd
    return f"/proc/self/fd/{fd}/{name}"


def worker_socket(run_dir: str, index: int) -> str:
    """The Unix socket worker ``index`` takes jobs on."""
    return _socket_in(run_dir, f"worker-{index}.sock")


def connection_socket(run_dir: str, pid: int) -> str:
    """The Unix datagram socket HTTP process ``pid`` takes passed connections on
    (:mod:`ringcast.server.passing`)."""
    return _socket_in(run_dir, f"conns-{pid}.sock")


def ready_file(run_dir: str, role: str, index: int) -> str:
    """Written by HTTP process or worker ``index`` (``role`` "http" or "worker") once it
    serves; the supervisor waits for every one at start-up."""
    return os.path.join(run_dir, f"ready-{role}-{index}")


RUN_DIR_PREFIX = "ringcast-run-"
"""Run directories are ``<tmp>/ringcast-run-<manager pid>-<random>``."""


RUN_DIR_LOCK = "manager.lock"
"""In a run directory: a file its manager holds an exclusive ``flock`` on while it runs."""


def _run_dir_in_use(path: str, pid: int) -> bool:
    """Whether the manager of a run directory still runs: it holds the directory's lock (the
    kernel drops it when the manager dies, whatever pid namespace it lives in). A directory
    without a lock file (its manager is between making it and locking it) falls back to
    whether the pid in its name exists here."""
    try:
        fd = os.open(os.path.join(path, RUN_DIR_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # held: its manager runs
    finally:
        os.close(fd)
    return False


def lock_run_dir(path: str) -> int:
    """Creates and locks the run directory's lock file; the descriptor stays open (and the
    lock held) for the manager's lifetime."""
    fd = os.open(os.path.join(path, RUN_DIR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def sweep_stale_run_dirs(base: str) -> list[str]:
    """Removes the run directories of managers that are gone: a manager killed with ``kill
    -9`` runs no clean-up, and its directory (worker sockets, config, counters) would stay.
    Only this user's directories, and only those whose manager no longer holds their lock
    (see ``_run_dir_in_use``). Returns what it removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RUN_DIR_PREFIX):
            continue
        try:
            pid = int(entry.name[len(RUN_DIR_PREFIX) :].split("-", 1)[0])
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except (ValueError, OSError):
            continue
        if _run_dir_in_use(entry.path, pid):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed
