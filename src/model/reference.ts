/** @module model/reference — a deliberately simple float64 Llama-family forward pass, the oracle tests check the ONNX graph against. */
import type { BaseWeights, LayerWeights } from "./checkpoint.ts";
import {
  type BottleneckModuleWeights,
  IA3_INPUT_SCALED,
  moduleKey,
  type Projection,
  type SequenceAdapterWeights,
} from "./contract.ts";
import { type ModelSpec, ropeInverseFrequencies } from "./model-spec.ts";

// Everything here is plain loops over float64 rows: slow, but obviously HF's math, with no shared
// code (and no shared bugs) with the graph builder. Only the weights themselves are float32.

export interface ReferenceInput {
  /** token ids; an id >= spec.vocabSize addresses row (id - vocabSize) of virtualEmbeddings */
  tokens: number[];
  /** [n, hidden] soft-prompt rows */
  virtualEmbeddings?: Float32Array;
  /** absolute positions per token; default: prefixLength + index */
  positions?: number[];
  adapters?: SequenceAdapterWeights;
  /** prefix tuning: per layer keys/values [numKvHeads, prefixLength, headDim] that sit in the cache BEFORE the tokens (already "rotated": used as-is, like HF past_key_values) */
  prefix?: { length: number; keys: Float32Array[]; values: Float32Array[] };
}

export interface ReferenceOutput {
  /** [tokens.length, vocab], row-major */
  logits: Float32Array;
  /** per layer, this call's rotated keys [numKvHeads, tokens.length, headDim] (the prefix layout) */
  keys: Float32Array[];
  /** per layer, this call's values [numKvHeads, tokens.length, headDim] */
  values: Float32Array[];
}

type Row = Float64Array;

/** y = x W^T (+ bias) for one row; W is HF Linear layout [out, in]. */
function matVec(
  x: ArrayLike<number>,
  w: Float32Array,
  outDim: number,
  bias: Float32Array | null = null,
): Row {
  const inDim = x.length;
  const y = new Float64Array(outDim);
  for (let o = 0; o < outDim; o++) {
    let acc = bias ? bias[o]! : 0;
    const base = o * inDim;
    for (let i = 0; i < inDim; i++) acc += x[i]! * w[base + i]!;
    y[o] = acc;
  }
  return y;
}

function rmsNorm(x: Row, weight: Float32Array, eps: number): Row {
  let sq = 0;
  for (let i = 0; i < x.length; i++) sq += x[i]! * x[i]!;
  const inv = 1 / Math.sqrt(sq / x.length + eps);
  return x.map((v, i) => v * inv * weight[i]!);
}

const silu = (v: number): number => v / (1 + Math.exp(-v));

function addInPlace(h: Row, delta: Row): void {
  for (let i = 0; i < h.length; i++) h[i]! += delta[i]!;
}

/** A projection with its per-sequence PEFT paths: IA3 input scale, LoRA delta, IA3 output scale (PEFT order). */
function project(
  x: Row,
  w: Float32Array,
  bias: Float32Array | null,
  outDim: number,
  key: string,
  projection: Projection,
  adapters: SequenceAdapterWeights | undefined,
): Row {
  const ia3 = adapters?.ia3?.get(key);
  const inputScaled = IA3_INPUT_SCALED.includes(projection);
  const input = ia3 && inputScaled ? x.map((v, i) => v * ia3[i]!) : x;
  const y = matVec(input, w, outDim, bias);
  const lora = adapters?.lora?.get(key);
  if (lora) addInPlace(y, matVec(matVec(input, lora.a, lora.rank), lora.b, outDim));
  if (ia3 && !inputScaled) for (let o = 0; o < outDim; o++) y[o]! *= ia3[o]!;
  return y;
}

/** Houlsby adapter on a block output: out + up(silu(down(out) + downBias)) + upBias. */
function bottleneck(out: Row, m: BottleneckModuleWeights | undefined): Row {
  if (!m) return out;
  const mid = matVec(out, m.down, m.size, m.downBias).map(silu);
  const delta = matVec(mid, m.up, out.length, m.upBias);
  return out.map((v, i) => v + delta[i]!);
}

/** HF rotate_half RoPE on every head of one row, in place: x*cos + rotate_half(x)*sin. */
function rope(x: Row, numHeads: number, headDim: number, invFreq: Float64Array, position: number): void {
  const half = headDim / 2;
  for (let i = 0; i < half; i++) {
    const angle = invFreq[i]! * position;
    const cos = Math.cos(angle);
    const sin = Math.sin(angle);
    for (let h = 0; h < numHeads; h++) {
      const a = h * headDim + i;
      const b = a + half;
      const x1 = x[a]!;
      const x2 = x[b]!;
      x[a] = x1 * cos - x2 * sin;
      x[b] = x2 * cos + x1 * sin;
    }
  }
}

/** Rows [KVH, P + T, headDim] of one layer's cache: the prefix (as given) followed by this call's rows. */
function cacheRows(spec: ModelSpec, prefix: Float32Array | null, prefixLength: number, rows: Row[]): Row[][] {
  const { numKvHeads, headDim } = spec;
  const out: Row[][] = [];
  for (let kh = 0; kh < numKvHeads; kh++) {
    const head: Row[] = [];
    for (let p = 0; p < prefixLength; p++) {
      const start = (kh * prefixLength + p) * headDim;
      head.push(Float64Array.from(prefix!.subarray(start, start + headDim)));
    }
    for (const row of rows) head.push(row.subarray(kh * headDim, (kh + 1) * headDim));
    out.push(head);
  }
  return out;
}

/** Causal grouped-query attention of token t (cache index prefixLength + t) for all query heads. */
function attend(spec: ModelSpec, q: Row, keys: Row[][], values: Row[][], lastIndex: number): Row {
  const { numHeads, numKvHeads, headDim } = spec;
  const group = numHeads / numKvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const out = new Float64Array(numHeads * headDim);
  for (let h = 0; h < numHeads; h++) {
    const kh = Math.floor(h / group);
    const scores = new Float64Array(lastIndex + 1);
    for (let j = 0; j <= lastIndex; j++) {
      let dot = 0;
      for (let d = 0; d < headDim; d++) dot += q[h * headDim + d]! * keys[kh]![j]![d]!;
      scores[j] = dot * scale;
    }
    const probs = softmax(scores);
    for (let j = 0; j <= lastIndex; j++) {
      const v = values[kh]![j]!;
      for (let d = 0; d < headDim; d++) out[h * headDim + d]! += probs[j]! * v[d]!;
    }
  }
  return out;
}

function softmax(scores: Float64Array): Float64Array {
  const max = Math.max(...scores);
  const e = scores.map((s) => Math.exp(s - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

/** Rows [T, KVH*HS] -> [KVH, T, HS] float32: the layout prefix tuning feeds back in. */
function toHeadMajor(spec: ModelSpec, rows: Row[]): Float32Array {
  const { numKvHeads, headDim } = spec;
  const out = new Float32Array(numKvHeads * rows.length * headDim);
  rows.forEach((row, t) => {
    for (let kh = 0; kh < numKvHeads; kh++) {
      out.set(row.subarray(kh * headDim, (kh + 1) * headDim), (kh * rows.length + t) * headDim);
    }
  });
  return out;
}

interface LayerContext {
  spec: ModelSpec;
  layer: number;
  w: LayerWeights;
  input: ReferenceInput;
  positions: number[];
  invFreq: Float64Array;
}

/** Attention block for all tokens; returns the block outputs and this call's keys/values. */
function attentionBlock(ctx: LayerContext, hidden: Row[]) {
  const { spec, layer, w, input, positions, invFreq } = ctx;
  const qDim = spec.numHeads * spec.headDim;
  const kvDim = spec.numKvHeads * spec.headDim;
  const adapters = input.adapters;
  const key = (m: Projection) => moduleKey(layer, m);
  const qs: Row[] = [];
  const ks: Row[] = [];
  const vs: Row[] = [];
  hidden.forEach((h, t) => {
    const x = rmsNorm(h, w.inputNorm, spec.rmsNormEps);
    const q = project(x, w.qProj, w.qBias, qDim, key("q_proj"), "q_proj", adapters);
    const k = project(x, w.kProj, w.kBias, kvDim, key("k_proj"), "k_proj", adapters);
    rope(q, spec.numHeads, spec.headDim, invFreq, positions[t]!);
    rope(k, spec.numKvHeads, spec.headDim, invFreq, positions[t]!);
    qs.push(q);
    ks.push(k);
    vs.push(project(x, w.vProj, w.vBias, kvDim, key("v_proj"), "v_proj", adapters));
  });
  const p = input.prefix?.length ?? 0;
  const keys = cacheRows(spec, input.prefix?.keys[layer] ?? null, p, ks);
  const values = cacheRows(spec, input.prefix?.values[layer] ?? null, p, vs);
  const outputs = qs.map((q, t) => {
    const o = project(
      attend(spec, q, keys, values, p + t),
      w.oProj,
      w.oBias,
      spec.hiddenSize,
      key("o_proj"),
      "o_proj",
      adapters,
    );
    return bottleneck(o, adapters?.bottleneck?.get(moduleKey(layer, "attn")));
  });
  return { outputs, keys: toHeadMajor(spec, ks), values: toHeadMajor(spec, vs) };
}

/** SwiGLU MLP on one (already residual-added) row: down(silu(gate(x)) * up(x)). */
function mlpBlock(ctx: LayerContext, h: Row): Row {
  const { spec, layer, w } = ctx;
  const adapters = ctx.input.adapters;
  const ff = spec.intermediateSize;
  const x = rmsNorm(h, w.postNorm, spec.rmsNormEps);
  const gate = project(x, w.gateProj, null, ff, moduleKey(layer, "gate_proj"), "gate_proj", adapters);
  const up = project(x, w.upProj, null, ff, moduleKey(layer, "up_proj"), "up_proj", adapters);
  const act = gate.map((g, i) => silu(g) * up[i]!);
  const down = project(
    act,
    w.downProj,
    null,
    spec.hiddenSize,
    moduleKey(layer, "down_proj"),
    "down_proj",
    adapters,
  );
  return bottleneck(down, adapters?.bottleneck?.get(moduleKey(layer, "mlp")));
}

function embedTokens(spec: ModelSpec, weights: BaseWeights, input: ReferenceInput): Row[] {
  const d = spec.hiddenSize;
  return input.tokens.map((id) => {
    if (id < spec.vocabSize) return Float64Array.from(weights.embed.subarray(id * d, (id + 1) * d));
    const row = id - spec.vocabSize;
    const virtual = input.virtualEmbeddings;
    if (!virtual || (row + 1) * d > virtual.length)
      throw new Error(`token ${id}: no virtual embedding row ${row}`);
    return Float64Array.from(virtual.subarray(row * d, (row + 1) * d));
  });
}

/** The full forward pass, also returning each layer's rotated keys/values (what a cache would hold). */
export function referenceRun(spec: ModelSpec, weights: BaseWeights, input: ReferenceInput): ReferenceOutput {
  const prefixLength = input.prefix?.length ?? 0;
  const positions = input.positions ?? input.tokens.map((_, i) => prefixLength + i);
  if (positions.length !== input.tokens.length) throw new Error("positions and tokens differ in length");
  const invFreq = ropeInverseFrequencies(spec);
  const hidden = embedTokens(spec, weights, input);
  const keys: Float32Array[] = [];
  const values: Float32Array[] = [];
  weights.layers.forEach((w, layer) => {
    const ctx: LayerContext = { spec, layer, w, input, positions, invFreq };
    const attn = attentionBlock(ctx, hidden);
    keys.push(attn.keys);
    values.push(attn.values);
    hidden.forEach((h, t) => {
      addInPlace(h, attn.outputs[t]!);
      addInPlace(h, mlpBlock(ctx, h));
    });
  });
  const logits = new Float32Array(input.tokens.length * spec.vocabSize);
  hidden.forEach((h, t) => {
    logits.set(
      matVec(rmsNorm(h, weights.finalNorm, spec.rmsNormEps), weights.lmHead, spec.vocabSize),
      t * spec.vocabSize,
    );
  });
  return { logits, keys, values };
}

/** Logits [tokens.length, vocab], row-major. */
export function referenceForward(spec: ModelSpec, weights: BaseWeights, input: ReferenceInput): Float32Array {
  return referenceRun(spec, weights, input).logits;
}

/** Numerically stable log-softmax of one logits row, in float64. */
export function logSoftmax(row: Float32Array | number[]): Float64Array {
  let max = Number.NEGATIVE_INFINITY;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const logZ = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - logZ);
}
