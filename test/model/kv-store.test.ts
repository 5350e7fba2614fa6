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
    const P = Math.max(...rows.map((id) => kv.lengthOf(id)));
    const mirror = kv.assembleDecode(rows, P);
    assert.ok(mirror.capacity >= P, `capacity ${mirror.capacity} covers the longest past ${P}`);
    assert.equal(mirror.capacity % 32, 0, "capacity grows in steps of 32");
    assert.ok(mirror.capacity - P <= 32, `slack ${mirror.capacity - P} stays within one step`);
    const exact = kv.assemble(rows, P);
    for (let l = 0; l < SHAPE.numLayers; l++) {
      rows.forEach((id, b) => {
        const len = kv.lengthOf(id);
        assert.deepEqual(
          rowPast(mirror.keys[l]!, b, mirror.capacity, len),
          rowPast(exact.keys[l]!, b, P, len),
          `step ${step} layer ${l} row ${id}: keys`,
        );
        assert.deepEqual(
          rowPast(mirror.values[l]!, b, mirror.capacity, len),
          rowPast(exact.values[l]!, b, P, len),
          `step ${step} layer ${l} row ${id}: values`,
        );
        checked++;
      });
    }
    appendStep(
      kv,
      rows,
      rows.map(() => 1),
      rng,
    );
  }
  assert.equal(checked, 80 * 3 * SHAPE.numLayers);
});
