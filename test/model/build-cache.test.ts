import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import {
  BUILDER_FINGERPRINT,
  BUILDER_VERSION,
  buildOrReuseGraph,
  graphCacheKey,
  pruneStaleGraphs,
} from "../../src/model/builder/build-cache.ts";
import type { Checkpoint } from "../../src/model/checkpoint.ts";
import { FULL_PEFT_LAYOUT } from "../../src/model/contract.ts";
import { makeRandomModel } from "../helpers/random-model.ts";

/** A cache entry as some builder version left it (null: from before build.json existed). */
function entry(root: string, name: string, version: number | null, builderFingerprint?: string): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "model.onnx"), "x");
  if (version !== null)
    writeFileSync(join(dir, "build.json"), JSON.stringify({ builderVersion: version, builderFingerprint }));
  return dir;
}

test("pruning removes older builders' graphs (and edited builders') and keeps the current, newer, in-progress and foreign entries", () => {
  const root = mkdtempSync(join(tmpdir(), "taskmux-cache-"));
  try {
    const legacy = entry(root, "a".repeat(24), null);
    const older = entry(root, "b".repeat(24), BUILDER_VERSION - 1);
    const same = entry(root, "c".repeat(24), BUILDER_VERSION);
    const sameSource = entry(root, "9".repeat(24), BUILDER_VERSION, BUILDER_FINGERPRINT);
    const edited = entry(root, "8".repeat(24), BUILDER_VERSION, "0123456789abcdef");
    const newer = entry(root, "d".repeat(24), BUILDER_VERSION + 1);
    const current = entry(root, "e".repeat(24), null);
    const building = entry(root, `${"f".repeat(24)}.tmp-1-2`, null);
    const foreign = entry(root, "notes", null);
    const removed = pruneStaleGraphs(root, "e".repeat(24));
    assert.deepEqual(removed.sort(), ["8".repeat(24), "a".repeat(24), "b".repeat(24)]);
    assert.equal(existsSync(legacy), false, "no build.json: an older builder's");
    assert.equal(existsSync(older), false, "lower version");
    assert.equal(existsSync(edited), false, "this version built from other builder source");
    for (const kept of [same, sameSource, newer, current, building, foreign])
      assert.ok(existsSync(kept), `${kept} kept`);
    assert.deepEqual(pruneStaleGraphs(join(root, "missing"), ""), [], "a missing cache dir prunes nothing");
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("a fresh build records its builder version and clears an older builder's graph; a cache hit prunes nothing", () => {
  const root = mkdtempSync(join(tmpdir(), "taskmux-cache-"));
  try {
    const { spec, weights } = makeRandomModel({}, 2);
    const checkpoint = {
      dir: "(in memory)",
      spec,
      weights,
      generation: { eosTokenIds: [] },
      contentHash: `build-cache-test-${Date.now()}`,
      parameterCount: 0,
      storedDtypes: ["F32"],
    } satisfies Checkpoint;
    const options = { peft: FULL_PEFT_LAYOUT, rope: "contrib" as const };
    const stale = entry(root, "0".repeat(24), BUILDER_VERSION - 1);
    const built = buildOrReuseGraph(checkpoint, options, root);
    assert.equal(built.cacheHit, false);
    assert.deepEqual(built.staleRemoved, ["0".repeat(24)]);
    assert.equal(existsSync(stale), false, "the older graph is gone");
    const info = JSON.parse(readFileSync(join(built.modelPath, "..", "build.json"), "utf8"));
    assert.equal(info.builderVersion, BUILDER_VERSION);
    const again = entry(root, "1".repeat(24), BUILDER_VERSION - 1);
    const hit = buildOrReuseGraph(checkpoint, options, root);
    assert.equal(hit.cacheHit, true);
    assert.deepEqual(hit.staleRemoved, [], "a cache hit leaves the cache alone");
    assert.ok(existsSync(again), "kept on a cache hit");
  } finally {
    rmSync(root, { recursive: true, force: true });
  }
});

test("the cache key covers the builder's own source, so an edited builder never reuses the old graph", () => {
  assert.match(BUILDER_FINGERPRINT, /^[0-9a-f]{16}$/, "the builder's sources are read beside it");
  const checkpoint = { contentHash: "same-weights" };
  const options = { peft: FULL_PEFT_LAYOUT, rope: "contrib" as const };
  assert.equal(graphCacheKey(checkpoint, options), graphCacheKey(checkpoint, options, BUILDER_FINGERPRINT));
  assert.notEqual(
    graphCacheKey(checkpoint, options, BUILDER_FINGERPRINT),
    graphCacheKey(checkpoint, options, "0123456789abcdef"),
    "another builder source, another graph",
  );
});
