/**
 * @module model/load-model — checkpoint dir -> a running ModelBackend + tokenizer: inspect the checkpoint,
 * build (or reuse) the graph, start the session in the model worker (or in-process).
 */
import { buildOrReuseGraph } from "./builder/build-cache.ts";
import type { GraphOptions } from "./builder/llama-graph.ts";
import { type CheckpointInfo, inspectCheckpoint } from "./checkpoint.ts";
import { FULL_PEFT_LAYOUT, type ModelBackend, type PeftLayout } from "./contract.ts";
import type { PoolCapacity } from "./peft-pools.ts";
import { ModelRunner, type RunnerOptions } from "./runner.ts";
import { TextTokenizer } from "./tokenizer.ts";
import { WorkerBackend } from "./worker-backend.ts";

export interface LoadModelOptions {
  modelDir: string;
  cacheDir: string;
  threads: number;
  pools: PoolCapacity;
  peft?: PeftLayout;
  /** Run the session on this thread (tests); the server uses the worker. */
  inProcess?: boolean;
}

export interface LoadedModel {
  info: CheckpointInfo;
  tokenizer: TextTokenizer;
  backend: ModelBackend;
  /** Facts for the start-up log line. */
  report: {
    graphCacheHit: boolean;
    graphBuildMs: number;
    sessionMs: number;
    parameterCount: number;
    weightBytes: number;
    storedDtypes: string[];
  };
}

export async function loadModel(options: LoadModelOptions): Promise<LoadedModel> {
  const info = inspectCheckpoint(options.modelDir);
  const tokenizer = TextTokenizer.load(options.modelDir);
  const peft = options.peft ?? FULL_PEFT_LAYOUT;
  const graph: GraphOptions = { peft, rope: "contrib" };
  const built = buildOrReuseGraph(info, graph, options.cacheDir);
  const runnerOptions: RunnerOptions = {
    modelPath: built.modelPath,
    spec: info.spec,
    peft,
    pools: options.pools,
    threads: options.threads,
  };
  const started = performance.now();
  const backend = options.inProcess
    ? await ModelRunner.create(runnerOptions)
    : await WorkerBackend.start(runnerOptions);
  return {
    info,
    tokenizer,
    backend,
    report: {
      graphCacheHit: built.cacheHit,
      graphBuildMs: built.buildMs,
      sessionMs: performance.now() - started,
      parameterCount: built.parameterCount || countParameters(info),
      weightBytes: built.weightBytes,
      storedDtypes: built.storedDtypes,
    },
  };
}

/** Parameter count from the shape alone (used when a cached graph means the weights were never read). */
export function countParameters({ spec }: Pick<CheckpointInfo, "spec">): number {
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const perLayer = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * spec.intermediateSize;
  const bias = spec.qkvBias ? q + 2 * kv : 0;
  const head = spec.tieWordEmbeddings ? 0 : spec.vocabSize * d;
  return spec.vocabSize * d + spec.numLayers * (perLayer + bias + (spec.oBias ? d : 0)) + d + head;
}
