#!/usr/bin/env python3
"""Fails if a module of ringcast-core uses a module of its own layer or above it, or if one of
the things that has a single home in the core (atomics, the futex call, mapping memory) shows
up elsewhere.

The layer order is written once, in the `# Layers` section of `rust/ringcast-core/src/lib.rs`
(a `//!` line of module names joined by arrows, lowest first). Every top-level module (a file
`src/NAME.rs` or a folder `src/NAME/`) must be listed there, and may name (`crate::NAME`, also
inside `use crate::{...}` groups) only modules listed before it. In a total order a cycle
always contains an upward edge, so this also rules out cycles; when there is one it is printed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "rust" / "ringcast-core" / "src"
ROOT = "lib"  # the crate root re-exports from every layer

# What only one file of the core may name (docs/ARCHITECTURE.md relies on these).
SINGLE_HOME = [
    ("an atomics import", r"\b(std|loom)::sync::atomic\b", "sync.rs"),
    ("the futex system call", r"\bSYS_futex\b", "sys/futex.rs"),
    ("mapping memory", r"\blibc::(mmap|munmap)\b", "sys/mmap.rs"),
]


def layer_order(lib_rs: str) -> list[str]:
    """The module names of the `# Layers` section's arrow line, lowest first."""
    lines = lib_rs.splitlines()
    try:
        start = lines.index("//! # Layers")
    except ValueError:
        sys.exit(f"{SRC / 'lib.rs'}: no '//! # Layers' section naming the module order")
    for line in lines[start + 1 :]:
        if not line.startswith("//!"):
            break
        if "→" in line:
            return [name.strip(" `") for name in line.removeprefix("//!").split("→")]
    sys.exit(f"{SRC / 'lib.rs'}: the '# Layers' section has no 'a → b → ...' line")


def strip_comments(text: str) -> str:
    """The code without `//` comments (doc comments included), so prose naming a module does
    not count as a use. Good enough for this crate, which has no `//` inside string literals
    that precede a `crate::` path on the same line."""
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def used_modules(code: str) -> set[str]:
    """Top-level modules named through `crate::`, also as items of `crate::{a, b::c}`."""
    used = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
    for match in re.finditer(r"\bcrate::\{", code):
        depth, items, item = 1, [], ""
        for c in code[match.end() :]:
            depth += {"{": 1, "}": -1}.get(c, 0)
            if depth == 0:
                break
            if depth == 1 and c == ",":
                items.append(item)
                item = ""
            else:
                item += c
        items.append(item)
        used.update(m.group(1) for i in items if (m := re.match(r"\s*([a-z_][a-z0-9_]*)", i)))
    return used


def modules() -> dict[str, list[Path]]:
    """Each top-level module of the crate with the files it is made of."""
    found: dict[str, list[Path]] = {}
    for path in sorted(SRC.rglob("*.rs")):
        rel = path.relative_to(SRC)
        name = rel.parts[0].removesuffix(".rs")
        found.setdefault(name, []).append(path)
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the module graph, if there is any."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def main() -> int:
    order = layer_order((SRC / "lib.rs").read_text())
    rank = {name: i for i, name in enumerate(order)}
    errors: list[str] = []
    edges: dict[str, set[str]] = {}
    for name, files in modules().items():
        if name == ROOT:
            continue
        if name not in rank:
            errors.append(f"module {name!r} is not placed in the layer order of lib.rs")
            continue
        for path in files:
            for used in sorted(used_modules(strip_comments(path.read_text())) - {name}):
                edges.setdefault(name, set()).add(used)
                if used not in rank:
                    errors.append(f"{path.relative_to(SRC)}: uses unknown module {used!r}")
                elif rank[used] > rank[name]:
                    errors.append(
                        f"{path.relative_to(SRC)}: {name} uses {used}, a higher layer "
                        f"(order: {' → '.join(order)})"
                    )
    for path in sorted(SRC.rglob("*.rs")):
        code = strip_comments(path.read_text())
        for what, pattern, home in SINGLE_HOME:
            if str(path.relative_to(SRC)) != home and re.search(pattern, code):
                errors.append(f"{path.relative_to(SRC)}: {what}, which belongs in {home} only")
    cycle = find_cycle(edges)
    if cycle:
        errors.append("module cycle: " + " → ".join(cycle))
    for error in errors:
        print(f"check-core-layers: {error}", file=sys.stderr)
    if not errors:
        print(f"check-core-layers: {len(order)} layers, every use points down")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
