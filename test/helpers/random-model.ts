/** @module test/helpers/random-model — seeded tiny random Llama-family models (spec + weights) for tests. */
import type { BaseWeights, LayerWeights } from "../../src/model/checkpoint.ts";
import { makeRng } from "../../src/model/maker/prng.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";

export { makeRng, type Rng } from "../../src/model/maker/prng.ts";

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
