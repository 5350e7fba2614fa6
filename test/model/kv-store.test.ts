import assert from "node:assert/strict";
import { test } from "node:test";
import { KvStore } from "../../src/model/kv-store.ts";
import { makeRng } from "../../src/model/maker/prng.ts";

const SHAPE = { numLayers: 2, numKvHeads: 2, headDim: 4 };
const KV_DIM = SHAPE.numKvHeads * SHAPE.headDim;

/** Append `count` random tokens to each sequence, as one step of `seqLen` padded tokens per row. */
function appendStep(kv: KvStore, seqIds: number[], counts: number[], rng: ReturnType<typeof makeRng>) {
  const seqLen = Math.max(...counts);
  const fresh = () =>
    Array.from({ length: SHAPE.numLayers }, () =>
      Float32Array.from({ length: seqIds.length * seqLen * KV_DIM }, () => rng.uniform()),
    );
  kv.append(seqIds, counts, seqLen, fresh(), fresh());
}

/** Row b's first `length` positions of a [B, KVH, P, HS] tensor, head-major. */
function rowPast(t: Float32Array, b: number, P: number, length: number): number[] {
  const out: number[] = [];
  for (let h = 0; h < SHAPE.numKvHeads; h++) {
    const base = (b * SHAPE.numKvHeads + h) * P * SHAPE.headDim;
    out.push(...t.subarray(base, base + length * SHAPE.headDim));
  }
  return out;
}

/** The step's rows in the order the graph is fed them (slot order). */
function fedOrder(rows: number[], slots: number[]): number[] {
  const fed = new Array<number>(rows.length);
  rows.forEach((id, b) => {
    fed[slots[b]!] = id;
  });
  return fed;
}

test("the decode mirror holds each row's exact past while rows decode, regrow past 32 positions and change", () => {
  const rng = makeRng(9);
  const kv = new KvStore(SHAPE);
  let rows = [1, 2, 3];
  appendStep(kv, rows, [5, 30, 12], rng); // prefill of different lengths
  let checked = 0;
  for (let step = 0; step < 80; step++) {
    if (step === 20) {
      kv.free(2); // a row finishes...
      rows = [1, 3, 4];
      appendStep(kv, [4], [7], rng); // ...and a new one joins after its prefill
    }
    if (step === 50) rows = [3, 1, 4]; // same rows, another order
    if (step === 60) rows = [4, 1]; // a row sits out a step...
    if (step === 61) rows = [3, 1, 4]; // ...and comes back
    const P = Math.max(...rows.map((id) => kv.lengthOf(id)));
    const mirror = kv.assembleDecode(rows, P);
    assert.ok(mirror.capacity >= P, `capacity ${mirror.capacity} covers the longest past ${P}`);
    assert.equal(mirror.capacity % 32, 0, "capacity grows in steps of 32");
    assert.ok(mirror.capacity - P <= 32, `slack ${mirror.capacity - P} stays within one step`);
    assert.deepEqual(
      [...mirror.slots].sort(),
      rows.map((_, b) => b),
      "the rows fill slots 0..B-1",
    );
    const fed = fedOrder(rows, mirror.slots);
    const exact = kv.assemble(fed, P);
    for (let l = 0; l < SHAPE.numLayers; l++) {
      fed.forEach((id, slot) => {
        const len = kv.lengthOf(id);
        assert.deepEqual(
          rowPast(mirror.keys[l]!, slot, mirror.capacity, len),
          rowPast(exact.keys[l]!, slot, P, len),
          `step ${step} layer ${l} row ${id}: keys`,
        );
        assert.deepEqual(
          rowPast(mirror.values[l]!, slot, mirror.capacity, len),
          rowPast(exact.values[l]!, slot, P, len),
          `step ${step} layer ${l} row ${id}: values`,
        );
        checked++;
      });
    }
    // The graph's new K/V come back in slot order, and so are appended.
    appendStep(
      kv,
      fed,
      fed.map(() => 1),
      rng,
    );
  }
  assert.equal(checked, 79 * 3 * SHAPE.numLayers + 2 * SHAPE.numLayers);
});

test("a row keeps its mirror slot while it decodes: one finishing moves no other row", () => {
  const rng = makeRng(3);
  const kv = new KvStore(SHAPE);
  const rows = [10, 11, 12, 13];
  appendStep(kv, rows, [4, 6, 5, 3], rng);
  const P = () => Math.max(...rows.map((id) => kv.lengthOf(id)));
  const before = kv.assembleDecode(rows, P());
  assert.deepEqual(before.slots, [0, 1, 2, 3], "a fresh mirror takes the step's order");
  appendStep(kv, rows, [1, 1, 1, 1], rng);
  kv.free(11);
  rows.splice(1, 1); // 11 finished...
  rows.push(14); // ...and 14 joins at the end of the batch, after its prefill
  appendStep(kv, [14], [9], rng);
  const after = kv.assembleDecode(rows, P());
  assert.deepEqual(after.slots, [0, 2, 3, 1], "10, 12 and 13 stay where they were; 14 takes 11's slot");
  kv.free(10);
  rows.shift(); // three rows left: 13, in slot 3, moves into the vacated slot 0
  const shrunk = kv.assembleDecode(rows, P());
  assert.deepEqual(shrunk.slots, [2, 0, 1]);
  const exact = kv.assemble(fedOrder(rows, shrunk.slots), P());
  assert.deepEqual(
    rowPast(shrunk.keys[0]!, 0, shrunk.capacity, kv.lengthOf(13)),
    rowPast(exact.keys[0]!, 0, P(), kv.lengthOf(13)),
    "the moved row's past was copied in",
  );
});
