"""The dependencies in ``pyproject.toml`` match what the commands import.

CI installs ``[dev]``, which holds every optional package, so a command that imports one
unguarded works there and dies on a user's ``pip install .``. These tests take the installed
extras away again: a static check of every import in the package against the dependency
lists, and real ``ringcast`` commands run in interpreters (and their child processes) where
only the standard library and the runtime dependencies can be imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from ringcast._extras import EXTRA_OF

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "python" / "ringcast"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    """``"redis[hiredis]>=5"`` -> ``"redis"``."""
    m = re.match(r"[A-Za-z0-9_.-]+", requirement)
    assert m is not None, requirement
    return m.group(0).lower().replace("_", "-")


RUNTIME = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}


def _modules_of(dists: set[str]) -> set[str]:
    """The top-level modules that these distributions and everything they require install
    (an import name may differ from its distribution's: ``prometheus_client``)."""
    closure: set[str] = set()
    todo = list(dists)
    while todo:
        dist = todo.pop()
        if dist in closure:
            continue
        closure.add(dist)
        try:
            reqs = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker excludes this platform
        todo += [_dist_name(r) for r in reqs if "extra ==" not in r]
    return {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(_dist_name(o) in closure for o in owners)
    }


RUNTIME_MODULES = _modules_of(RUNTIME)
EXTRAS = {
    name: {_dist_name(r) for r in reqs}
    for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
}


def _third_party_imports() -> list[tuple[str, int, str, bool]]:
    """Every import of a module outside the standard library and ringcast in the package:
    (file, line, top-level module, at module level?)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ringcast":
                    continue
                rel = str(path.relative_to(REPO))
                found.append((rel, node.lineno, top, id(node) in top_level))
    return found


def test_every_import_is_a_declared_dependency() -> None:
    imports = _third_party_imports()
    assert imports, "the scan found no third-party import at all"
    for file, line, module, module_level in imports:
        where = f"{file}:{line} imports {module}"
        if module in RUNTIME_MODULES:
            continue
        # Not a runtime dependency: only an optional package, imported inside the function
        # that uses it, whose extra installs it.
        assert module in EXTRA_OF, f"{where}, which is neither a dependency nor an extra"
        assert not module_level, f"{where} at module level; import it where it is used"
        assert module in EXTRAS[EXTRA_OF[module]], f"{where}; [{EXTRA_OF[module]}] lacks it"


def test_every_runtime_dependency_is_used_at_run_time() -> None:
    used = {module for _, _, module, _ in _third_party_imports()}
    unused = {d for d in RUNTIME if not _modules_of({d}) & used}
    assert not unused, f"runtime dependencies nothing imports: {unused}"
    # What only the tests import belongs to [dev].
    assert "multiprocess" not in RUNTIME
    assert "multiprocess" in EXTRAS["dev"]


def test_every_optional_import_is_guarded() -> None:
    """Each module an extra brings is checked through ringcast._extras.require by the code
    that imports it, so its absence is reported before the command does any work."""
    for file, line, module, _ in _third_party_imports():
        if module in RUNTIME_MODULES:
            continue
        source = (REPO / file).read_text()
        assert f'require("{module}"' in source, f"{file}:{line}: {module} is not checked"


# An interpreter of a plain `pip install .`: a finder placed first on sys.meta_path refuses
# every module that is neither in the standard library nor ringcast or a runtime dependency.
# It goes in through sitecustomize, so the server's child interpreters get it too.
SITECUSTOMIZE = """\
import sys

ALLOWED = set(sys.stdlib_module_names) | {"ringcast"} | set(%r)


class OnlyRuntimeDependencies:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in ALLOWED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, OnlyRuntimeDependencies())
"""


@pytest.fixture
def bare_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE % sorted(RUNTIME_MODULES))
    return {**os.environ, "PYTHONPATH": str(site)}


def ringcast(
    env: dict[str, str], *args: str, cwd: Path, timeout: float = 100
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ringcast.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def test_the_blocker_blocks(bare_env: dict[str, str], tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-c", "import matplotlib"], capture_output=True, text=True, env=bare_env
    )
    assert res.returncode == 1
    assert "blocked by the test" in res.stderr


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["--png", "out.png"], "plot"),
        (["--compare", "redis"], "redis"),
    ],
)
def test_a_missing_extra_stops_replay_before_any_work(
    bare_env: dict[str, str], tmp_path: Path, args: list[str], extra: str
) -> None:
    trace = tmp_path / "t.jsonl"
    ringcast(bare_env, "trace", "synth", "--streams", "2", "--out", str(trace), cwd=tmp_path)
    res = ringcast(
        bare_env, "replay", str(trace), "--json", "r.json", "--no-progress", *args, cwd=tmp_path
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"pip install 'ringcast[{extra}]'" in lines[0]
    assert not (tmp_path / "r.json").exists()  # no run was started
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("option", "value"),
    [("--redis", "redis://127.0.0.1:1"), ("--redis-cluster", "127.0.0.1:1")],
)
def test_a_missing_redis_extra_names_the_option_given(
    bare_env: dict[str, str], tmp_path: Path, option: str, value: str
) -> None:
    res = ringcast(bare_env, "serve", "--port", "0", option, value, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert f"{option} needs redis" in line
    assert "pip install 'ringcast[redis]'" in line
    other = "--redis-cluster" if option == "--redis" else "--redis "
    assert other not in line


def test_every_command_works_with_runtime_dependencies_only(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    for command in ([], ["serve"], ["record"], ["trace"], ["trace", "synth"], ["replay"]):
        res = ringcast(bare_env, *command, "--help", cwd=tmp_path)
        assert res.returncode == 0, (command, res.stderr)
    trace = tmp_path / "t.jsonl"
    res = ringcast(bare_env, "trace", "synth", "--streams", "3", "--out", str(trace), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = ringcast(bare_env, "trace", "info", str(trace), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # A whole load test: `ringcast serve --replay` started by it (its children import under
    # the same blocker), every byte checked, the JSON report with psutil's process figures.
    res = ringcast(
        bare_env,
        "replay",
        str(trace),
        "--fanout",
        "2",
        "--speed",
        "max",
        "--http-procs",
        "1",
        "--no-progress",
        "--json",
        "r.json",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    target = report["targets"][0]
    assert target["errors"] == 0 and target["mismatches"] == 0
    assert target["events_received"] == target["events_expected"] > 0
    assert any(p["role"].startswith("ringcast") for p in target["processes"])


def test_serve_and_record_with_runtime_dependencies_only(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    serve = subprocess.Popen(
        [
            *(sys.executable, "-m", "ringcast.cli", "serve", "--port", "0", "--http-procs", "1"),
            *("--tokens-per-s", "0", "--segment", str(tmp_path / "seg")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=bare_env,
    )
    try:
        assert serve.stdout is not None
        url = None
        for line in serve.stdout:
            if m := re.search(r"listening on (http://[\w.\-:]+)", line):
                url = m.group(1)
                break
        assert url is not None, "ringcast serve did not start"
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}) + "\n"
        )
        res = ringcast(
            bare_env,
            "record",
            "--upstream",
            url + "/v1",
            "--requests",
            str(prompts),
            "--out",
            "rec.jsonl",
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
        stream = json.loads((tmp_path / "rec.jsonl").read_text().splitlines()[1])
        assert stream["status"] == 200 and stream["events"][-1][1].endswith("data: [DONE]\n\n")
    finally:
        serve.terminate()
        serve.communicate(timeout=30)
