/** @module test/helpers/graph-runner — build the real graph for a made-up model and run it in-process. */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { buildOrReuseGraph } from "../../src/model/builder/build-cache.ts";
import type { RopeImplementation } from "../../src/model/builder/llama-graph.ts";
import type { QuantBlockSize, WeightFormat } from "../../src/model/builder/quantize.ts";
import type { BaseWeights, Checkpoint } from "../../src/model/checkpoint.ts";
import { FULL_PEFT_LAYOUT, type PeftLayout } from "../../src/model/contract.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import type { PoolCapacity } from "../../src/model/peft-pools.ts";
import { ModelRunner } from "../../src/model/runner.ts";
import { TEST_CACHE_DIR } from "./tiny-model.ts";

export const TEST_POOLS: PoolCapacity = {
  loraSlots: 3,
  maxLoraRank: 4,
  ia3Slots: 3,
  bottleneckSlots: 3,
  maxBottleneckSize: 4,
};

export async function runnerFor(
  spec: ModelSpec,
  weights: BaseWeights,
  options: {
    peft?: PeftLayout;
    pools?: PoolCapacity;
    rope?: RopeImplementation;
    weights?: WeightFormat;
    quantBlockSize?: QuantBlockSize;
  } = {},
): Promise<ModelRunner> {
  const hash = createHash("sha256");
  hash.update(JSON.stringify(spec));
  for (const l of weights.layers) hash.update(l.qProj).update(l.downProj);
  hash.update(weights.embed).update(weights.lmHead);
  const checkpoint = {
    dir: "(in memory)",
    spec,
    weights,
    generation: { eosTokenIds: [] },
    contentHash: hash.digest("hex"),
    parameterCount: 0,
    storedDtypes: ["F32"],
  } satisfies Checkpoint;
  const peft = options.peft ?? FULL_PEFT_LAYOUT;
  const built = buildOrReuseGraph(
    checkpoint,
    {
      peft,
      rope: options.rope ?? "contrib",
      weights: options.weights ?? "fp32",
      quantBlockSize: options.quantBlockSize,
    },
    join(TEST_CACHE_DIR, "made-up"),
  );
  return ModelRunner.create({
    modelPath: built.modelPath,
    spec,
    peft,
    pools: options.pools ?? TEST_POOLS,
    threads: 1,
  });
}

/** max |a - b| / max |b| over a row */
export function relativeError(actual: Float32Array, expected: ArrayLike<number>): number {
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < actual.length; i++) {
    diff = Math.max(diff, Math.abs(actual[i]! - expected[i]!));
    scale = Math.max(scale, Math.abs(expected[i]!));
  }
  return diff / (scale || 1);
}
