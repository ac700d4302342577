#!/usr/bin/env bash
# Python tests (real processes, real servers, real clients). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== pytest"; python -m pytest -q "$@"
