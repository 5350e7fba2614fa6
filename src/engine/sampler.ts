/** @module engine/sampler — logits row -> token (greedy, temperature, top-k, top-p, seeded) and logprobs; pure. */
import { makeRng, type Rng } from "../model/maker/prng.ts";

export interface SamplingParams {
  /** 0 = greedy */
  temperature: number;
  /** (0, 1] */
  topP: number;
  /** 0 = no limit */
  topK: number;
  /** fixed seed -> reproducible tokens, alone or batched */
  seed: number | null;
}

export interface TokenLogprob {
  token: number;
  logprob: number;
}

export function createSamplerRng(seed: number | null): Rng {
  return makeRng(seed ?? Math.floor(Math.random() * 2 ** 32));
}

/** Numerically stable log-softmax of one row (raw model logits, temperature 1: what logprobs report). */
export function logSoftmaxRow(row: Float32Array): Float64Array {
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < row.length; i++) if (row[i]! > max) max = row[i]!;
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i]! - max);
  const logZ = max + Math.log(sum);
  const out = new Float64Array(row.length);
  for (let i = 0; i < row.length; i++) out[i] = row[i]! - logZ;
  return out;
}

/**
 * True when no entry is NaN or ±Infinity. A plain loop: `row.some(Number.isFinite)` with its per-element call
 * cost ~0.4 ms a 49k-vocabulary row, which at 8-32 rows a step was most of the engine's time between steps.
 */
export function allFinite(row: Float32Array): boolean {
  for (let i = 0; i < row.length; i++) {
    const v = row[i]!;
    if (v - v !== 0) return false; // NaN - NaN and Inf - Inf are NaN
  }
  return true;
}

export function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

/** Indices of the k largest values, largest first (binary min-heap, O(V log k)). */
export function topKIndices(values: ArrayLike<number>, k: number): number[] {
  const n = Math.min(k, values.length);
  const heap: number[] = [];
  const less = (a: number, b: number) => values[a]! < values[b]! || (values[a] === values[b] && a > b);
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < heap.length && less(heap[l]!, heap[m]!)) m = l;
      if (r < heap.length && less(heap[r]!, heap[m]!)) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m]!, heap[i]!];
      i = m;
    }
  };
  for (let i = 0; i < values.length; i++) {
    if (heap.length < n) {
      heap.push(i);
      for (let c = heap.length - 1; c > 0; ) {
        const p = (c - 1) >> 1;
        if (!less(heap[c]!, heap[p]!)) break;
        [heap[c], heap[p]] = [heap[p]!, heap[c]!];
        c = p;
      }
    } else if (values[i]! > values[heap[0]!]!) {
      // Ids come in increasing order, so an equal value never beats the heap's minimum (ties keep lower ids).
      heap[0] = i;
      siftDown(0);
    }
  }
  return heap.sort((a, b) => (less(a, b) ? 1 : -1));
}

/** Top-n logprobs of a row (for OpenAI `top_logprobs`). */
export function topLogprobs(logprobs: Float64Array, n: number): TokenLogprob[] {
  if (n <= 0) return [];
  return topKIndices(logprobs, n).map((token) => ({ token, logprob: logprobs[token]! }));
}

/**
 * Pick the next token. Plain temperature sampling walks the distribution once; top-k uses a heap of k;
 * top-p finds its probability threshold with one native sort of the probabilities (no index sort).
 */
/** Greedy requests take the argmax: the graph's greedy_token, or argmax() over a row (the same choice). */
export function isGreedy(params: SamplingParams): boolean {
  return params.temperature === 0 || params.topK === 1;
}

/**
 * Working rows reused across calls: a sampled request used to allocate two vocabulary-sized Float64Arrays per
 * token, and the engine samples every row of a step back to back on one thread (never re-entrantly).
 */
let probsScratch = new Float64Array(0);
let keptScratch = new Float64Array(0);

export function sampleToken(row: Float32Array, params: SamplingParams, rng: Rng): number {
  if (isGreedy(params)) return argmax(row);
  const invT = 1 / params.temperature;
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < row.length; i++) if (row[i]! > max) max = row[i]!;
  if (probsScratch.length !== row.length) {
    probsScratch = new Float64Array(row.length);
    keptScratch = new Float64Array(row.length);
  }
  const probs = probsScratch;
  for (let i = 0; i < row.length; i++) probs[i] = Math.exp((row[i]! - max) * invT);
  if (params.topK > 0 && params.topK < row.length) {
    const kept = keptScratch.fill(0);
    for (const i of topKIndices(probs, params.topK)) kept[i] = probs[i]!;
    return sampleFrom(nucleus(kept, params.topP), rng);
  }
  return sampleFrom(nucleus(probs, params.topP), rng);
}

/** How many of the largest probabilities top-p first looks for its cut among, before sorting them all. */
const NUCLEUS_CANDIDATES = 256;

/**
 * Zero every probability outside the smallest set whose mass reaches topP. Ties at the edge keep the lower
 * ids, the order argmax and topKIndices use.
 */
function nucleus(probs: Float64Array, topP: number): Float64Array {
  if (topP >= 1) return probs;
  let total = 0;
  for (let i = 0; i < probs.length; i++) total += probs[i]!;
  // The cut almost always lies among the few largest probabilities: look there first (a heap pass instead of
  // sorting the vocabulary, ~20x faster); sort everything only when their mass falls short of topP. Both walk
  // the same descending prefix, so they find the same cut.
  const cutIn = (sorted: Float64Array): number => {
    let mass = 0;
    for (let i = 0; i < sorted.length; i++) {
      mass += sorted[i]! / total;
      if (mass >= topP) return i;
    }
    return -1;
  };
  let sorted = Float64Array.from(topKIndices(probs, NUCLEUS_CANDIDATES), (i) => probs[i]!);
  let cut = cutIn(sorted);
  if (cut < 0) {
    sorted = Float64Array.from(probs).sort().reverse();
    cut = cutIn(sorted);
    if (cut < 0) cut = sorted.length - 1;
  }
  const threshold = sorted[cut]!;
  let equalToKeep = cut + 1 - sorted.indexOf(threshold);
  for (let i = 0; i < probs.length; i++) {
    if (probs[i]! > threshold) continue;
    if (probs[i] === threshold && equalToKeep > 0) equalToKeep--;
    else probs[i] = 0;
  }
  return probs;
}

function sampleFrom(weights: Float64Array, rng: Rng): number {
  let sum = 0;
  let last = 0;
  for (let i = 0; i < weights.length; i++) {
    sum += weights[i]!;
    if (weights[i]! > 0) last = i;
  }
  let u = rng.uniform() * sum;
  for (let i = 0; i < weights.length; i++) {
    u -= weights[i]!;
    if (u <= 0 && weights[i]! > 0) return i;
  }
  return last;
}
