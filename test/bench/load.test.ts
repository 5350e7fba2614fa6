import assert from "node:assert/strict";
import { test } from "node:test";
import { aggregateDecode, emptyLoadResult, type LoadResult, steadyDecodeTokS } from "../../bench/load.ts";

function result(streams: LoadResult["streams"]): LoadResult {
  return { ...emptyLoadResult(), streams, requests: streams.length };
}
const every = (from: number, step: number, n: number) => Array.from({ length: n }, (_, i) => from + i * step);

test("aggregateDecode counts the tokens inside the window where every stream decodes", () => {
  // Stream 0 starts at 0, stream 1 at 50 (after a prefill); both emit every 10 ms until 200 / 250.
  const r = aggregateDecode([every(0, 10, 21), every(50, 10, 21)]);
  assert.equal(r.windowMs, 150, "window from the last first token (50) to the first last token (200)");
  assert.equal(r.tokens, 30, "15 tokens each in (50, 200]");
  assert.equal(r.tokS, 200);
  const single = aggregateDecode([every(0, 25, 5)]);
  assert.deepEqual(single, { tokS: 40, windowMs: 100, tokens: 4 }, "one stream: tokens after the first");
});

test("steadyDecodeTokS windows each round on its own, so the gap between rounds is not counted", () => {
  const load = result([
    { round: 0, tokenTimesMs: every(0, 10, 11) },
    { round: 0, tokenTimesMs: every(0, 10, 11) },
    // The second round starts after a 500 ms prefill pause.
    { round: 1, tokenTimesMs: every(600, 20, 11) },
    { round: 1, tokenTimesMs: every(600, 20, 11) },
  ]);
  // Round 0: 20 tokens in 100 ms; round 1: 20 tokens in 200 ms -> 40 tokens / 0.3 s.
  assert.ok(Math.abs(steadyDecodeTokS(load) - 40 / 0.3) < 1e-9, `got ${steadyDecodeTokS(load)}`);
  assert.ok(Number.isNaN(steadyDecodeTokS(result([{ round: 0, tokenTimesMs: [5] }]))), "no window: NaN");
});
