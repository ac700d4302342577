#!/usr/bin/env bash
# Installs everything the checks need on a fresh machine of this kind: Debian packages
# (Chromium for the EventSource test, redis-server for the Redis tier, Node for the Durable
# Streams conformance suite), a virtualenv in .venv with the project built in it (maturin,
# release mode) and its dev dependencies, and the suite's npm packages (ci/conformance,
# exactly as its package-lock.json pins them).
# Idempotent: a second run only rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
  echo "ci/setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "maturin>=1.16,<2"
# Editable install: the Rust extension is built in release mode, python/ is used in place.
python -m pip install -q -e ".[dev]"
python -c "import ringcast; print('ci/setup: ringcast', ringcast.LAYOUT_VERSION and 'layout', ringcast.LAYOUT_VERSION, 'ready')"
(cd ci/conformance && npm ci --no-audit --no-fund --loglevel=error)
echo "ci/setup: Durable Streams conformance suite installed in ci/conformance/node_modules"
