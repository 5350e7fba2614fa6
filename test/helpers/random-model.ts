/** @module test/helpers/random-model — seeded tiny random Llama-family models (spec + weights) for tests. */
import type { BaseWeights, LayerWeights } from "../../src/model/checkpoint.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";

/** Deterministic PRNG (mulberry32) with Box-Muller normals, so every test run sees the same model. */
export interface Rng {
  /** uniform in [0, 1) */
  uniform(): number;
  /** standard normal */
  normal(): number;
  /** n float32 values ~ N(mean, std^2) */
  normals(n: number, std?: number, mean?: number): Float32Array;
  /** integer in [0, n) */
  int(n: number): number;
}

export function makeRng(seed: number): Rng {
  let state = seed >>> 0;
  const uniform = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = (): number => {
    const u = 1 - uniform(); // (0, 1]: log stays finite
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
  };
  return {
    uniform,
    normal,
    normals: (n, std = 1, mean = 0) => Float32Array.from({ length: n }, () => mean + std * normal()),
    int: (n) => Math.floor(uniform() * n),
  };
}

/** A small Llama spec; override any field (GQA, biases, tying, rope scaling, architecture). */
export function randomSpec(overrides: Partial<ModelSpec> = {}): ModelSpec {
  return {
    architecture: "LlamaForCausalLM",
    hiddenSize: 32,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 8,
    intermediateSize: 48,
    vocabSize: 64,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: 128,
    tieWordEmbeddings: false,
    qkvBias: false,
    oBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
    ...overrides,
  };
}

export interface RandomModelOptions {
  /** std of linear weights and embeddings (default 0.02, HF's initializer_range) */
  std?: number;
  /** std of biases (default: std) */
  biasStd?: number;
}

/**
 * Random weights in HF layout: linears/embeddings ~ N(0, std^2), norms ~ 1 + N(0, 0.1^2), biases when
 * the spec asks for them; lmHead is the same array as embed when tieWordEmbeddings.
 */
export function makeRandomModel(
  overrides: Partial<ModelSpec> = {},
  seed = 1,
  options: RandomModelOptions = {},
): { spec: ModelSpec; weights: BaseWeights } {
  const spec = randomSpec(overrides);
  const rng = makeRng(seed);
  const std = options.std ?? 0.02;
  const biasStd = options.biasStd ?? std;
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  const mat = (rows: number, cols: number) => rng.normals(rows * cols, std);
  const norm = () => rng.normals(d, 0.1, 1);
  const bias = (on: boolean, n: number) => (on ? rng.normals(n, biasStd) : null);
  const layers: LayerWeights[] = [];
  for (let i = 0; i < spec.numLayers; i++) {
    layers.push({
      inputNorm: norm(),
      qProj: mat(q, d),
      kProj: mat(kv, d),
      vProj: mat(kv, d),
      oProj: mat(d, q),
      qBias: bias(spec.qkvBias, q),
      kBias: bias(spec.qkvBias, kv),
      vBias: bias(spec.qkvBias, kv),
      oBias: bias(spec.oBias, d),
      postNorm: norm(),
      gateProj: mat(ff, d),
      upProj: mat(ff, d),
      downProj: mat(d, ff),
    });
  }
  const embed = mat(spec.vocabSize, d);
  const finalNorm = norm();
  const lmHead = spec.tieWordEmbeddings ? embed : mat(spec.vocabSize, d);
  return { spec, weights: { embed, layers, finalNorm, lmHead } };
}
