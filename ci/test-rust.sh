#!/usr/bin/env bash
# Rust tests: unit, property (proptest) and integration tests of ringcast-core, then the loom
# model check of the ring's publish/validate protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test"; cargo test --workspace --exclude ringcast-py --quiet
echo "== loom"; RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p ringcast-core --lib --release --quiet
