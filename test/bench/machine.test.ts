import assert from "node:assert/strict";
import { test } from "node:test";
import { strongest } from "../../bench/machine.ts";

test("strongest keeps the higher bandwidth and GEMM rate of each measurement, field by field", () => {
  const before = { bandwidthBytesPerS: 21.5e9, gemmFlopsPerS: 170e9, threads: 2 };
  const after = { bandwidthBytesPerS: 31.9e9, gemmFlopsPerS: 86e9, threads: 2 };
  assert.deepEqual(strongest(before, after), {
    bandwidthBytesPerS: 31.9e9,
    gemmFlopsPerS: 170e9,
    threads: 2,
  });
  assert.deepEqual(strongest(before), before, "one measurement is its own best");
});
