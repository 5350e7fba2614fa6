/** Tests for the sampler: greedy, top-k/top-p support, seeded reproducibility, softmax frequencies, logprobs. */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  allFinite,
  argmax,
  createSamplerRng,
  logSoftmaxRow,
  type SamplingParams,
  sampleToken,
  topKIndices,
  topLogprobs,
} from "../../src/engine/sampler.ts";
import { makeRng } from "../../src/model/maker/prng.ts";

const params = (overrides: Partial<SamplingParams> = {}): SamplingParams => ({
  temperature: 1,
  topP: 1,
  topK: 0,
  seed: null,
  ...overrides,
});

const row = (...values: number[]) => Float32Array.from(values);

/** Draw `n` tokens from `logits` with one seeded rng; returns counts per token id. */
function histogram(logits: Float32Array, p: SamplingParams, n: number, seed = 1234): number[] {
  const rng = makeRng(seed);
  const counts = new Array<number>(logits.length).fill(0);
  for (let i = 0; i < n; i++) counts[sampleToken(logits, p, rng)]!++;
  return counts;
}

function softmax(values: number[], temperature = 1): number[] {
  const max = Math.max(...values);
  const e = values.map((v) => Math.exp((v - max) / temperature));
  const z = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / z);
}

function chiSquare(counts: number[], probs: number[]): number {
  const n = counts.reduce((a, b) => a + b, 0);
  return counts.reduce((acc, c, i) => acc + (c - n * probs[i]!) ** 2 / (n * probs[i]!), 0);
}

const GREEDY_ROWS: { name: string; logits: Float32Array; expected: number }[] = [
  { name: "max in the middle", logits: row(0.1, 2.5, -1, 2.4), expected: 1 },
  { name: "max last", logits: row(-3, -2, -1), expected: 2 },
  { name: "all negative, max first", logits: row(-0.5, -7, -9), expected: 0 },
  { name: "tie takes the lowest index", logits: row(1, 4, 4, 0), expected: 1 },
  { name: "single entry", logits: row(42), expected: 0 },
];

test("allFinite rejects a row with NaN, +Infinity or -Infinity anywhere", () => {
  const row = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 1e30);
  assert.equal(allFinite(row), true, "a row of large finite values is finite");
  for (const bad of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY]) {
    for (const at of [0, 517, 999]) {
      const copy = Float32Array.from(row);
      copy[at] = bad;
      assert.equal(allFinite(copy), false, `${bad} at ${at} must be caught`);
    }
  }
});

test("greedy (temperature 0) returns the argmax, the lowest index on ties", () => {
  const rng = makeRng(1);
  for (const c of GREEDY_ROWS) {
    assert.equal(argmax(c.logits), c.expected, c.name);
    assert.equal(sampleToken(c.logits, params({ temperature: 0 }), rng), c.expected, c.name);
  }
});

test("top_k = 1 is greedy at any temperature", () => {
  const rng = makeRng(2);
  for (const c of GREEDY_ROWS) {
    for (let i = 0; i < 20; i++) {
      assert.equal(sampleToken(c.logits, params({ temperature: 1.5, topK: 1 }), rng), c.expected, c.name);
    }
  }
});

test("a tiny top_p always samples the argmax", () => {
  const rng = makeRng(3);
  for (const c of GREEDY_ROWS) {
    for (let i = 0; i < 20; i++) {
      assert.equal(sampleToken(c.logits, params({ temperature: 2, topP: 1e-6 }), rng), c.expected, c.name);
    }
  }
});

test("topKIndices returns the k largest, largest first, ties broken by lower index", () => {
  const values = [3, 1, 3, 2, 5];
  const cases: [k: number, expected: number[]][] = [
    [0, []],
    [1, [4]],
    [2, [4, 0]],
    [3, [4, 0, 2]],
    [5, [4, 0, 2, 3, 1]],
    [9, [4, 0, 2, 3, 1]],
  ];
  for (const [k, expected] of cases) assert.deepEqual(topKIndices(values, k), expected, `k=${k}`);
});

test("topKIndices agrees with a full stable sort on random rows with many ties", () => {
  const rng = makeRng(4);
  for (let trial = 0; trial < 200; trial++) {
    const n = 1 + rng.int(40);
    const values = Array.from({ length: n }, () => rng.int(6));
    const sorted = [...values.keys()].sort((a, b) => values[b]! - values[a]! || a - b);
    const k = rng.int(n + 3);
    assert.deepEqual(topKIndices(values, k), sorted.slice(0, k), `values=${values} k=${k}`);
  }
});

/** The nucleus as first written: sort every probability, cut where the mass reaches topP (ties keep lower ids). */
function fullSortNucleusSample(row: Float32Array, temperature: number, topP: number, u: number): number {
  const max = Math.max(...row);
  const probs = Float64Array.from(row, (v) => Math.exp((v - max) / temperature));
  const total = probs.reduce((a, b) => a + b, 0);
  const order = [...probs.keys()].sort((a, b) => probs[b]! - probs[a]! || a - b);
  const kept = new Set<number>();
  let mass = 0;
  for (const i of order) {
    kept.add(i);
    mass += probs[i]! / total;
    if (mass >= topP) break;
  }
  const keptTotal = [...kept].reduce((a, i) => a + probs[i]!, 0);
  let rest = u * keptTotal;
  for (let i = 0; i < probs.length; i++) {
    if (!kept.has(i)) continue;
    rest -= probs[i]!;
    if (rest <= 0) return i;
  }
  return Math.max(...kept);
}

test("top-p picks the same tokens as sorting the whole vocabulary, whether or not the cut is among the 256 largest", () => {
  const rng = makeRng(11);
  for (const [vocab, spread] of [
    [3000, 12], // peaked: the cut lies among the largest few
    [3000, 0.01], // nearly flat: the 256 largest hold too little mass, the full sort decides
    [600, 3],
  ] as const) {
    // Rounded logits: many exact ties, including at the cut.
    const row = Float32Array.from({ length: vocab }, () => Math.round(rng.uniform() * spread * 4) / 4);
    for (const topP of [0.05, 0.5, 0.9, 0.999]) {
      for (let draw = 0; draw < 20; draw++) {
        const seed = 1000 * draw + vocab;
        const expected = fullSortNucleusSample(row, 0.7, topP, makeRng(seed).uniform());
        const got = sampleToken(row, params({ temperature: 0.7, topP }), makeRng(seed));
        assert.equal(got, expected, `vocab ${vocab} spread ${spread} topP ${topP} draw ${draw}`);
      }
    }
  }
});

test("the same seed reproduces the same tokens and different seeds differ", () => {
  const logits = Float32Array.from({ length: 50 }, (_, i) => Math.sin(i) * 2);
  const draw = (seed: number) => {
    const rng = createSamplerRng(seed);
    return Array.from({ length: 64 }, () => sampleToken(logits, params({ temperature: 1, seed }), rng));
  };
  assert.deepEqual(draw(7), draw(7));
  assert.notDeepEqual(draw(7), draw(8));
  assert.ok(new Set(draw(7)).size > 5, "a seeded draw is still random across tokens");
});

test("sampled frequencies follow softmax(logits / T) on a small vocabulary", () => {
  const logits = [2, 1, 0.5, 0, -1];
  const n = 20_000;
  for (const temperature of [0.5, 1, 2]) {
    const counts = histogram(Float32Array.from(logits), params({ temperature }), n);
    // 4 degrees of freedom: P(chi2 > 25) is about 5e-5.
    const chi2 = chiSquare(counts, softmax(logits, temperature));
    assert.ok(chi2 < 25, `T=${temperature}: chi2 = ${chi2.toFixed(1)}, counts ${counts}`);
  }
  // The same counts do not fit a wrong temperature: the test can tell distributions apart.
  const counts = histogram(Float32Array.from(logits), params({ temperature: 1 }), n);
  assert.ok(chiSquare(counts, softmax(logits, 2)) > 100);
});

test("top_k restricts sampling to the k most likely tokens, renormalised", () => {
  const logits = [0.2, 3, -1, 2.5, 1, 2.9];
  const counts = histogram(Float32Array.from(logits), params({ topK: 3 }), 20_000);
  const support = counts.flatMap((c, i) => (c > 0 ? [i] : []));
  assert.deepEqual(support, [1, 3, 5]);
  const probs = softmax([3, 2.5, 2.9]);
  assert.ok(chiSquare([counts[1]!, counts[3]!, counts[5]!], probs) < 20);
});

test("top_p keeps the smallest prefix of tokens whose mass reaches p", () => {
  const logits = Float32Array.from([0.5, 0.3, 0.2].map(Math.log));
  const cases: [topP: number, support: number[]][] = [
    [0.4, [0]],
    [0.5, [0]],
    [0.7, [0, 1]],
    [0.85, [0, 1, 2]],
    [1, [0, 1, 2]],
  ];
  for (const [topP, expected] of cases) {
    const counts = histogram(logits, params({ topP }), 3000);
    const support = counts.flatMap((c, i) => (c > 0 ? [i] : []));
    assert.deepEqual(support, expected, `topP=${topP}`);
  }
});

test("top_p over a flat large vocabulary widens the candidates beyond the first 64", () => {
  // 1000 equal logits: the nucleus is the first ~900 ids (ties go to lower ids), far more than 64.
  const logits = new Float32Array(1000);
  const counts = histogram(logits, params({ topP: 0.9 }), 500);
  const sampled = counts.flatMap((c, i) => (c > 0 ? [i] : []));
  assert.ok(sampled.length > 250, `sampled only ${sampled.length} distinct tokens`);
  assert.ok(sampled.at(-1)! < 901, `sampled id ${sampled.at(-1)} lies outside the top-p nucleus`);
});

test("logSoftmaxRow gives probabilities that sum to 1 and matches a direct softmax", () => {
  const rng = makeRng(5);
  for (let trial = 0; trial < 20; trial++) {
    const values = Array.from({ length: 1 + rng.int(100) }, () => rng.normal() * 5);
    const lp = logSoftmaxRow(Float32Array.from(values));
    const sum = lp.reduce((a, b) => a + Math.exp(b), 0);
    assert.ok(Math.abs(sum - 1) < 1e-12, `sum ${sum}`);
    const direct = softmax(Array.from(Float32Array.from(values)));
    lp.forEach((v, i) => {
      assert.ok(Math.abs(Math.exp(v) - direct[i]!) < 1e-12);
    });
  }
});

test("logSoftmaxRow stays finite and exact for huge logits", () => {
  const shifted = logSoftmaxRow(row(1e4, 1e4 + 1, 1e4 + 2));
  const plain = logSoftmaxRow(row(0, 1, 2));
  shifted.forEach((v, i) => {
    assert.ok(Number.isFinite(v));
    assert.ok(Math.abs(v - plain[i]!) < 1e-9, `${v} vs ${plain[i]}`);
  });
  const big = Math.fround(3e38);
  const extreme = logSoftmaxRow(row(big, 0, -big));
  assert.deepEqual(Array.from(extreme), [0, -big, -2 * big]);
});

test("topLogprobs returns the n best tokens with their logprobs, best first", () => {
  const lp = logSoftmaxRow(row(0.5, 3, -2, 1.5, 3));
  assert.deepEqual(topLogprobs(lp, 0), []);
  assert.deepEqual(topLogprobs(lp, -1), []);
  assert.deepEqual(
    topLogprobs(lp, 3),
    [1, 4, 3].map((token) => ({ token, logprob: lp[token]! })),
  );
  assert.equal(topLogprobs(lp, 10).length, 5);
  const top = topLogprobs(lp, 5);
  for (let i = 1; i < top.length; i++) assert.ok(top[i - 1]!.logprob >= top[i]!.logprob);
});
