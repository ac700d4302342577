#!/usr/bin/env bash
# Rust tests: unit, property (proptest) and integration tests of ringcast-core; the same
# integration tests under valgrind (memcheck: no invalid access to the mapping or the heap);
# then the loom model check of the ring's publish/validate protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test"; cargo test --workspace --exclude ringcast-py --quiet
echo "== valgrind (integration tests, scaled down)"
test_bin=$(cargo test -p ringcast-core --test segment --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "segment":
        print(m["executable"])')
RINGCAST_TEST_SCALE=0.05 valgrind -q --error-exitcode=9 --leak-check=no "$test_bin" --test-threads=1 -q
echo "== loom"; RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p ringcast-core --lib --release --quiet
