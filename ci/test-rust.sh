#!/usr/bin/env bash
# Rust tests: unit, property (proptest) and integration tests of ringcast-core, with the fuzz
# campaign over everything that reads shared memory (tests/fuzz.rs, ~1,000 cases per property,
# ~20 s); the integration tests and the fuzz again under valgrind, scaled down (memcheck: no
# invalid access to the mapping or the heap);
# then the loom model checks of the ring's publish/validate protocol, the index's lock-free
# lookups and the slot seqlock.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test"; cargo test --workspace --exclude ringcast-py --quiet
echo "== valgrind (integration tests and the fuzz campaign, scaled down)"
for name in segment fuzz; do
  test_bin=$(cargo test -p ringcast-core --test "$name" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$name")
  RINGCAST_TEST_SCALE=0.05 valgrind -q --error-exitcode=9 --leak-check=no "$test_bin" --test-threads=1 -q
done
echo "== loom"; RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p ringcast-core --lib --release --quiet
