import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    testTimeout: 30000,
    hookTimeout: 30000,
    // The suite's own node_modules path holds a copy of itself: never collect tests there.
    exclude: ["node_modules/**"],
  },
})
