#!/usr/bin/env bash
# The Durable Streams server conformance suite (npm @durable-streams/server-conformance-tests,
# installed by ci/setup.sh into ci/conformance) against a real `ringcast serve` with two HTTP
# processes. Fails if fewer tests pass than docs/DURABLE_STREAMS.md records.
set -euo pipefail
cd "$(dirname "$0")/.."
# docs/DURABLE_STREAMS.md, "Conformance": the suite's 338 tests, of which 6 are skipped
# (the reserved subscription APIs, off unless asked for). Keep the two in step.
MIN_PASSED=332
# shellcheck disable=SC1091
. .venv/bin/activate
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
work=$(mktemp -d)
segment="/dev/shm/ringcast-conformance-$$.seg"
# --max-sessions: the suite creates ~700 streams and deletes few; --ds-long-poll-timeout: the
# long-poll tests wait for it, within the suite's 5 s test timeout.
ringcast serve --port "$port" --http-procs 2 --workers 1 --segment "$segment" \
  --max-sessions 2048 --ds-long-poll-timeout 2 --cors-origin '*' >"$work/serve.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  # A clean stop removes the segment and its <segment>.wake/ directory itself
  # (tests/server/test_lifecycle.py checks both).
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 600); do
  grep -q "listening on" "$work/serve.log" && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; echo "ringcast serve exited"; exit 1; }
  sleep 0.1
done
grep -q "listening on" "$work/serve.log" || { cat "$work/serve.log"; echo "ringcast serve did not start"; exit 1; }
echo "== Durable Streams conformance suite against ringcast serve on port $port"
(
  cd ci/conformance
  DS_BASE_URL="http://127.0.0.1:$port/ds" DS_LONG_POLL_MS=2000 \
    npx vitest run --reporter=dot --reporter=json --outputFile.json="$work/results.json"
) || true
python - "$work/results.json" "$MIN_PASSED" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
passed, failed = r["numPassedTests"], r["numFailedTests"]
skipped = r["numPendingTests"] + r.get("numTodoTests", 0)
minimum = int(sys.argv[2])
print(f"conformance: {passed} passed, {failed} failed, {skipped} skipped of {r['numTotalTests']}"
      f" (at least {minimum} must pass)")
for suite in r["testResults"]:
    for t in suite["assertionResults"]:
        if t["status"] == "failed":
            print("  failed:", " > ".join(t["ancestorTitles"] + [t["title"]]))
sys.exit(0 if passed >= minimum else 1)
PY
