// The Durable Streams server conformance suite against a running server.
// ci/test-conformance.sh starts `ringcast serve` and sets DS_BASE_URL (http://host:port/ds).
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.DS_BASE_URL
if (!baseUrl) {
  throw new Error("set DS_BASE_URL to the server's Durable Streams base, e.g. http://127.0.0.1:8080/ds")
}

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.DS_LONG_POLL_MS ?? 20000),
})
