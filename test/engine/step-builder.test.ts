/** Tests for buildStep: padding, positions, the attention mask, logits rows, step-local virtual rows, slots. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { buildStep, type StepWork } from "../../src/engine/step-builder.ts";

const VOCAB = 10;
const HIDDEN = 2;

let nextSeqId = 1;
function makeWork(overrides: Partial<StepWork> = {}): StepWork {
  return {
    seqId: nextSeqId++,
    tokens: [1],
    pastLength: 0,
    logits: "last",
    loraSlot: 0,
    ia3Slot: 0,
    bottleneckSlot: 0,
    ...overrides,
  };
}

const nums = (a: BigInt64Array) => Array.from(a, Number);

/** The mask as one "0/1" string per flat row (b*T + t), each P + T wide. */
function maskRows(mask: Uint8Array, width: number): string[] {
  const rows: string[] = [];
  for (let r = 0; r < mask.length / width; r++) rows.push(mask.subarray(r * width, (r + 1) * width).join(""));
  return rows;
}

test("pads every row to the longest and records per-row bookkeeping", () => {
  const a = makeWork({ seqId: 7, tokens: [5, 6, 7], pastLength: 2 });
  const b = makeWork({ seqId: 8, tokens: [9], pastLength: 0 });
  const { batch } = buildStep([a, b], VOCAB, HIDDEN);
  assert.equal(batch.seqLen, 3);
  assert.equal(batch.pastLength, 2);
  assert.deepEqual(nums(batch.inputIds), [5, 6, 7, 9, 0, 0]);
  assert.deepEqual(batch.rows, [
    { seqId: 7, pastLength: 2, numNewTokens: 3 },
    { seqId: 8, pastLength: 0, numNewTokens: 1 },
  ]);
  assert.equal(batch.attentionMask.length, 2 * 3 * (2 + 3));
});

test("positions continue each row's past; padding positions repeat the row's past length", () => {
  const cases: { name: string; works: StepWork[]; positions: number[] }[] = [
    {
      name: "prefill from zero beside a decode",
      works: [makeWork({ tokens: [1, 2, 3] }), makeWork({ tokens: [4], pastLength: 9 })],
      positions: [0, 1, 2, 9, 9, 9],
    },
    {
      name: "a prefill chunk after earlier chunks",
      works: [makeWork({ tokens: [1, 2], pastLength: 64 })],
      positions: [64, 65],
    },
    {
      name: "decode rows only",
      works: [makeWork({ pastLength: 3 }), makeWork({ pastLength: 0 }), makeWork({ pastLength: 17 })],
      positions: [3, 0, 17],
    },
  ];
  for (const c of cases)
    assert.deepEqual(nums(buildStep(c.works, VOCAB, HIDDEN).batch.positionIds), c.positions, c.name);
});

test("the mask covers each row's own past, is causal over new tokens, and padding attends only to itself", () => {
  const works = [
    makeWork({ tokens: [1, 2, 3], pastLength: 2 }),
    makeWork({ tokens: [4], pastLength: 0 }),
    makeWork({ tokens: [5, 6], pastLength: 1 }),
  ];
  const { batch } = buildStep(works, VOCAB, HIDDEN);
  // P = 2, T = 3: columns are [past0 past1 | new0 new1 new2].
  assert.deepEqual(maskRows(batch.attentionMask, 5), [
    "11100", // row 0, t0: both past tokens + itself
    "11110",
    "11111",
    "00100", // row 1, t0: no past
    "00010", // row 1 padding: itself only
    "00001",
    "10100", // row 2, t0: its single past token, not past column 1
    "10110",
    "00001", // row 2 padding
  ]);
});

test("every mask row attends to at least one key, so no softmax row is fully masked", () => {
  const works = [makeWork({ tokens: [1] }), makeWork({ tokens: [1, 2, 3, 4], pastLength: 5 })];
  const { batch } = buildStep(works, VOCAB, HIDDEN);
  for (const r of maskRows(batch.attentionMask, batch.pastLength + batch.seqLen))
    assert.ok(r.includes("1"), r);
});

test("logits rows follow each work's request: last, all or none, in work order", () => {
  const works = [
    makeWork({ tokens: [1, 2, 3], logits: "last" }),
    makeWork({ tokens: [1, 2], logits: "all" }),
    makeWork({ tokens: [1, 2, 3], logits: "none" }),
    makeWork({ tokens: [1], logits: "last" }),
  ];
  const { batch, owners } = buildStep(works, VOCAB, HIDDEN);
  // T = 3: row b starts at flat index 3b.
  assert.deepEqual(nums(batch.logitsIndex), [2, 3, 4, 9]);
  assert.deepEqual(owners, [
    { work: 0, token: 2 },
    { work: 1, token: 0 },
    { work: 1, token: 1 },
    { work: 3, token: 0 },
  ]);
});

test("a step where no work wants logits returns an empty logits index", () => {
  const { batch, owners } = buildStep([makeWork({ tokens: [1, 2], logits: "none" })], VOCAB, HIDDEN);
  assert.equal(batch.logitsIndex.length, 0);
  assert.deepEqual(owners, []);
});

test("logits are fetched only when some work with logits rows reads their values (default: it does)", () => {
  const fetch = (...works: StepWork[]) => buildStep(works, VOCAB, HIDDEN).batch.fetchLogits;
  assert.equal(fetch(makeWork()), true, "default reads values");
  assert.equal(fetch(makeWork({ readsLogitValues: false })), false, "greedy-only row");
  assert.equal(fetch(makeWork({ readsLogitValues: false }), makeWork({ readsLogitValues: false })), false);
  assert.equal(fetch(makeWork({ readsLogitValues: false }), makeWork({ readsLogitValues: true })), true);
  assert.equal(
    fetch(makeWork({ readsLogitValues: false }), makeWork({ logits: "none" })),
    false,
    "none reads nothing",
  );
});

test("virtual ids are remapped into a step-local table after a zero pad row, shared tables placed once", () => {
  const x = Float32Array.from([1, 1, 2, 2]); // 2 rows
  const y = Float32Array.from([3, 3, 4, 4, 5, 5]); // 3 rows
  const works = [
    makeWork({ tokens: [VOCAB, VOCAB + 1, 3], virtualTable: x }),
    makeWork({ tokens: [VOCAB + 2, VOCAB], virtualTable: y }),
    makeWork({ tokens: [VOCAB + 1], virtualTable: x }),
    makeWork({ tokens: [4], virtualTable: y }), // holds a table but uses no virtual id this step
  ];
  const { batch } = buildStep(works, VOCAB, HIDDEN);
  // Step table: row 0 pad, x at rows 1-2, y at rows 3-5.
  assert.deepEqual(Array.from(batch.virtualEmbeddings), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
  assert.deepEqual(nums(batch.inputIds), [
    VOCAB + 1,
    VOCAB + 2,
    3,
    VOCAB + 3 + 2,
    VOCAB + 3,
    0,
    VOCAB + 2,
    0,
    0,
    4,
    0,
    0,
  ]);
});

test("a step without virtual ids carries only the zero pad row", () => {
  const cases = [
    [makeWork({ tokens: [1, 2] })],
    [makeWork({ tokens: [1], virtualTable: Float32Array.from([9, 9, 9, 9]) })],
  ];
  for (const works of cases) {
    const { batch } = buildStep(works, VOCAB, HIDDEN);
    assert.deepEqual(Array.from(batch.virtualEmbeddings), [0, 0]);
  }
});

test("adapter slots are one int64 per row, in work order", () => {
  const works = [
    makeWork({ loraSlot: 2, ia3Slot: 0, bottleneckSlot: 1 }),
    makeWork({ loraSlot: 0, ia3Slot: 3, bottleneckSlot: 0 }),
    makeWork({ loraSlot: 5, ia3Slot: 1, bottleneckSlot: 4 }),
  ];
  const { batch } = buildStep(works, VOCAB, HIDDEN);
  assert.ok(batch.loraSlots instanceof BigInt64Array);
  assert.deepEqual(nums(batch.loraSlots), [2, 0, 5]);
  assert.deepEqual(nums(batch.ia3Slots), [0, 3, 1]);
  assert.deepEqual(nums(batch.bottleneckSlots), [1, 0, 4]);
});
