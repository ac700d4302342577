// The Node reference server (@durable-streams/server), for the conformance baseline and the
// benchmark (bench/ds_sse_fanout.py): `node reference-server.mjs PORT [LONG_POLL_MS]`
// prints "listening on http://127.0.0.1:PORT" and serves until it is killed.
import { DurableStreamTestServer } from "@durable-streams/server"

const port = Number(process.argv[2] ?? 4437)
const longPollTimeout = Number(process.argv[3] ?? 30000)
const server = new DurableStreamTestServer({ port, host: "127.0.0.1", longPollTimeout })
const url = await server.start()
console.log(`listening on ${url}`)
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, async () => {
    await server.stop()
    process.exit(0)
  })
}
