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
    } else if (less(heap[0]!, i)) {
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
 * Pick the next token. Candidates grow from the top 64 until they cover top_p of the mass, so the
 * full vocabulary is sorted only when the distribution is flat.
 */
export function sampleToken(row: Float32Array, params: SamplingParams, rng: Rng): number {
  if (params.temperature === 0 || params.topK === 1) return argmax(row);
  const invT = 1 / params.temperature;
  let max = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < row.length; i++) if (row[i]! > max) max = row[i]!;
  const probs = new Float64Array(row.length);
  let total = 0;
  for (let i = 0; i < row.length; i++) {
    const p = Math.exp((row[i]! - max) * invT);
    probs[i] = p;
    total += p;
  }
  const limit = params.topK > 0 ? Math.min(params.topK, row.length) : row.length;
  let k = Math.min(64, limit);
  let candidates: number[];
  let mass: number;
  for (;;) {
    candidates = topKIndices(probs, k);
    mass = 0;
    let cut = candidates.length;
    for (let i = 0; i < candidates.length; i++) {
      mass += probs[candidates[i]!]! / total;
      if (mass >= params.topP) {
        cut = i + 1;
        break;
      }
    }
    if (cut < candidates.length || mass >= params.topP || k >= limit) {
      candidates = candidates.slice(0, cut);
      break;
    }
    k = Math.min(limit, k * 4);
  }
  let sum = 0;
  for (const c of candidates) sum += probs[c]!;
  let u = rng.uniform() * sum;
  for (const c of candidates) {
    u -= probs[c]!;
    if (u <= 0) return c;
  }
  return candidates[candidates.length - 1]!;
}
