/** Tests for KvCacheAccount: reservation rounding and reserve/release accounting. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { KvCacheAccount } from "../../src/engine/kv-cache.ts";

/** An account of `tokens` capacity where one token costs `bytesPerToken` bytes. */
const makeAccount = (tokens: number, bytesPerToken = 16) =>
  new KvCacheAccount({ capacityBytes: tokens * bytesPerToken, bytesPerToken });

test("a reservation is the next power of two of prompt + max_tokens, at least one 64-token granule", () => {
  const cases: [maxTotalTokens: number, reserved: number][] = [
    [0, 64],
    [1, 64],
    [63, 64],
    [64, 64],
    [65, 128],
    [100, 128],
    [128, 128],
    [129, 256],
    [1000, 1024],
    [1024, 1024],
    [1025, 2048],
    [4097, 8192],
    [1_000_000, 1_048_576],
  ];
  for (const [maxTotalTokens, reserved] of cases) {
    assert.equal(
      KvCacheAccount.reservationFor(maxTotalTokens),
      reserved,
      `reservationFor(${maxTotalTokens})`,
    );
  }
});

test("capacity in tokens is the byte budget divided by bytes per token, rounded down", () => {
  assert.equal(new KvCacheAccount({ capacityBytes: 1000, bytesPerToken: 3 }).capacityTokens, 333);
  assert.equal(makeAccount(256).capacityTokens, 256);
});

test("fitsAtAll compares one rounded reservation with the whole capacity", () => {
  const kv = makeAccount(256);
  const cases: [maxTotalTokens: number, fits: boolean][] = [
    [1, true],
    [200, true],
    [256, true],
    [257, false],
    [10_000, false],
  ];
  for (const [n, fits] of cases) assert.equal(kv.fitsAtAll(n), fits, `fitsAtAll(${n})`);
  kv.reserve(1, 256);
  assert.equal(kv.fitsAtAll(256), true, "fitsAtAll ignores current reservations");
  assert.equal(kv.canReserve(1), false);
});

test("canReserve accounts for rounded reservations and release gives the tokens back", () => {
  const kv = makeAccount(256);
  kv.reserve(1, 100); // 128
  assert.equal(kv.canReserve(128), true);
  assert.equal(kv.canReserve(129), false, "129 rounds to 256, which no longer fits");
  kv.reserve(2, 65); // 128
  assert.equal(kv.canReserve(1), false, "even the smallest granule does not fit a full cache");
  assert.equal(kv.numSequences, 2);
  kv.release(1);
  assert.equal(kv.canReserve(128), true);
  assert.equal(kv.canReserve(129), false);
  kv.release(2);
  assert.equal(kv.canReserve(256), true);
  assert.equal(kv.numSequences, 0);
});

test("reserving the same sequence twice and releasing unknown ones do not change the account", () => {
  const kv = makeAccount(1024, 8);
  kv.reserve(7, 300); // 512
  kv.reserve(7, 300);
  kv.reserve(7, 1000);
  assert.equal(kv.numSequences, 1);
  assert.equal(kv.usedBytes, 512 * 8);
  kv.release(99);
  assert.equal(kv.usedBytes, 512 * 8);
  kv.release(7);
  kv.release(7);
  assert.equal(kv.usedBytes, 0);
  assert.equal(kv.numSequences, 0);
});

test("usageFraction and usedBytes follow reservations", () => {
  const kv = makeAccount(512, 4);
  const steps: { op: "reserve" | "release"; id: number; tokens?: number; fraction: number }[] = [
    { op: "reserve", id: 1, tokens: 10, fraction: 64 / 512 },
    { op: "reserve", id: 2, tokens: 200, fraction: (64 + 256) / 512 },
    { op: "reserve", id: 3, tokens: 128, fraction: (64 + 256 + 128) / 512 },
    { op: "release", id: 2, fraction: (64 + 128) / 512 },
    { op: "release", id: 1, fraction: 128 / 512 },
    { op: "release", id: 3, fraction: 0 },
  ];
  for (const s of steps) {
    if (s.op === "reserve") kv.reserve(s.id, s.tokens!);
    else kv.release(s.id);
    assert.equal(kv.usageFraction, s.fraction, `${s.op} ${s.id}`);
    assert.equal(kv.usedBytes, s.fraction * 512 * 4, `${s.op} ${s.id}`);
  }
});

test("an account with zero capacity reports zero usage and fits nothing", () => {
  const kv = new KvCacheAccount({ capacityBytes: 10, bytesPerToken: 100 });
  assert.equal(kv.capacityTokens, 0);
  assert.equal(kv.usageFraction, 0);
  assert.equal(kv.fitsAtAll(1), false);
  assert.equal(kv.canReserve(1), false);
});
