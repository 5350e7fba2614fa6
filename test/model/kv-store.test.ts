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

test("each sequence's past is what was appended, though decode steps write the mirror alone", () => {
  const rng = makeRng(21);
  const kv = new KvStore(SHAPE);
  /** per sequence, per layer: appended keys and values, position-major [length][KVH * HS] */
  const shadow = new Map<number, { keys: number[][][]; values: number[][][] }>();
  const append = (ids: number[], counts: number[]) => {
    const seqLen = Math.max(...counts);
    const fresh = () =>
      Array.from({ length: SHAPE.numLayers }, () =>
        Float32Array.from({ length: ids.length * seqLen * KV_DIM }, () => rng.uniform()),
      );
    const keys = fresh();
    const values = fresh();
    ids.forEach((id, b) => {
      const s = shadow.get(id) ?? {
        keys: Array.from({ length: SHAPE.numLayers }, () => []),
        values: Array.from({ length: SHAPE.numLayers }, () => []),
      };
      shadow.set(id, s);
      for (let l = 0; l < SHAPE.numLayers; l++) {
        for (let t = 0; t < counts[b]!; t++) {
          const at = (b * seqLen + t) * KV_DIM;
          s.keys[l]!.push([...keys[l]!.subarray(at, at + KV_DIM)]);
          s.values[l]!.push([...values[l]!.subarray(at, at + KV_DIM)]);
        }
      }
    });
    kv.append(ids, counts, seqLen, keys, values);
  };
  /** Head-major, like rowPast. */
  const expected = (positions: number[][], length: number) => {
    const out: number[] = [];
    for (let h = 0; h < SHAPE.numKvHeads; h++)
      for (let p = 0; p < length; p++)
        out.push(...positions[p]!.slice(h * SHAPE.headDim, (h + 1) * SHAPE.headDim));
    return out;
  };
  const checkAll = (when: string) => {
    for (const [id, s] of shadow) {
      const len = kv.lengthOf(id);
      assert.equal(len, s.keys[0]!.length, `${when}: sequence ${id} length`);
      const exact = kv.assemble([id], len);
      for (let l = 0; l < SHAPE.numLayers; l++) {
        assert.deepEqual(
          rowPast(exact.keys[l]!, 0, len, len),
          expected(s.keys[l]!, len),
          `${when}: ${id} keys`,
        );
        assert.deepEqual(
          rowPast(exact.values[l]!, 0, len, len),
          expected(s.values[l]!, len),
          `${when}: ${id} values`,
        );
      }
    }
  };
  let nextId = 1;
  const live: number[] = [];
  const join = () => {
    const id = nextId++;
    live.push(id);
    append([id], [1 + Math.floor(rng.uniform() * 20)]);
  };
  for (let i = 0; i < 4; i++) join();
  let decodeSteps = 0;
  const capacities = new Set<number>();
  for (let step = 0; step < 150; step++) {
    const roll = rng.uniform();
    if (roll < 0.05 && live.length > 1) {
      const id = live.splice(Math.floor(rng.uniform() * live.length), 1)[0]!;
      kv.free(id);
      shadow.delete(id);
      join();
    } else if (roll < 0.1) {
      // A multi-token step for rows that have been decoding (their newest positions live in the mirror).
      const ids = live.filter(() => rng.uniform() < 0.6);
      if (ids.length)
        append(
          ids,
          ids.map(() => 1 + Math.floor(rng.uniform() * 3)),
        );
    } else if (roll < 0.13) {
      const id = live[Math.floor(rng.uniform() * live.length)]!;
      const len = kv.lengthOf(id);
      if (len > 2) {
        kv.truncate(id, len - 1);
        const s = shadow.get(id)!;
        for (let l = 0; l < SHAPE.numLayers; l++) {
          s.keys[l]!.pop();
          s.values[l]!.pop();
        }
      }
    } else {
      // A decode step: some rows sit out, the rest in a shuffled order.
      const rows = live.filter(() => rng.uniform() < 0.85).sort(() => rng.uniform() - 0.5);
      if (!rows.length) continue;
      const P = Math.max(...rows.map((id) => kv.lengthOf(id)));
      const mirror = kv.assembleDecode(rows, P);
      capacities.add(mirror.capacity);
      const fed = fedOrder(rows, mirror.slots);
      fed.forEach((id, slot) => {
        const s = shadow.get(id)!;
        const len = kv.lengthOf(id);
        for (let l = 0; l < SHAPE.numLayers; l++)
          assert.deepEqual(
            rowPast(mirror.keys[l]!, slot, mirror.capacity, len),
            expected(s.keys[l]!, len),
            `step ${step}: mirror row ${id} layer ${l}`,
          );
      });
      append(
        fed,
        fed.map(() => 1),
      );
      decodeSteps++;
    }
    if (step % 10 === 9) checkAll(`step ${step}`);
  }
  checkAll("the end");
  assert.ok(decodeSteps > 100, `${decodeSteps} decode steps`);
  assert.ok(capacities.size >= 2, `the mirror re-laid (capacities ${[...capacities].join(", ")})`);
});
