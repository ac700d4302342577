#!/usr/bin/env bash
# The project's whole check, as the README gives it: set up, lint, Rust tests, Python tests,
# the Durable Streams conformance suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
bash ci/lint.sh
bash ci/test-rust.sh
bash ci/test-python.sh "$@"
bash ci/test-conformance.sh
