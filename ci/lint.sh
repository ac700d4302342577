#!/usr/bin/env bash
# Static checks: rustfmt, clippy (warnings denied, incl. undocumented unsafe blocks), the
# one-way module layers of ringcast-core, ruff, mypy (strict), mypy.stubtest of the
# hand-written _core.pyi against the built extension, and import-linter (the Python package's
# layers: no upward import, no circle).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== cargo fmt --check"; cargo fmt --all -- --check
echo "== cargo clippy"; cargo clippy --all-targets --quiet -- -D warnings
echo "== core module layers"; python3 ci/check-core-layers.py
echo "== ruff"; ruff check python tests bench
echo "== ruff format --check"; ruff format --check python tests bench
echo "== mypy"; mypy
echo "== lint-imports"; lint-imports --no-cache
echo "== stubtest"; python -m mypy.stubtest ringcast._core --allowlist ci/stubtest-allowlist.txt
