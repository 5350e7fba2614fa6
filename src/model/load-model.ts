/**
 * @module model/load-model — checkpoint dir -> a running ModelBackend + tokenizer: inspect the checkpoint,
 * build (or reuse) the graph, start the session in the model worker (or in-process).
 */
import { buildOrReuseGraph } from "./builder/build-cache.ts";
import type { GraphOptions } from "./builder/llama-graph.ts";
import type { QuantBlockSize, WeightFormat } from "./builder/quantize.ts";
import { type CheckpointInfo, inspectCheckpoint } from "./checkpoint.ts";
import { FULL_PEFT_LAYOUT, type ModelBackend, type PeftLayout } from "./contract.ts";
import {
  candidateDevices,
  type Device,
  type DeviceChoice,
  describeFailure,
  executionProviders,
  machineFacts,
} from "./device.ts";
import type { PoolCapacity } from "./peft-pools.ts";
import { ModelRunner, type RunnerOptions } from "./runner.ts";
import { TextTokenizer } from "./tokenizer.ts";
import { WorkerBackend } from "./worker-backend.ts";

export interface LoadModelOptions {
  modelDir: string;
  cacheDir: string;
  threads: number;
  /** Spin onnxruntime's threads within a step (SessionOptions.spin). */
  spin?: boolean;
  pools: PoolCapacity;
  peft?: PeftLayout;
  /** How the graph stores and multiplies the base weights (default fp32; see GraphOptions.weights). */
  weights?: WeightFormat;
  /** int8/int4: values per quantisation block (default 32; see GraphOptions.quantBlockSize). */
  quantBlockSize?: QuantBlockSize;
  /** Run the session on this thread (tests); the server uses the worker. */
  inProcess?: boolean;
  /** Execution provider (default cpu); `auto` takes the first that initialises. */
  device?: DeviceChoice;
}

export interface LoadedModel {
  info: CheckpointInfo;
  tokenizer: TextTokenizer;
  backend: ModelBackend;
  /** Facts for the start-up log line. */
  report: {
    graphCacheHit: boolean;
    graphBuildMs: number;
    /** Cached graphs of older builder versions removed by this start's build. */
    staleGraphsRemoved: number;
    sessionMs: number;
    parameterCount: number;
    weightBytes: number;
    storedDtypes: string[];
    /** The graph's weight format (GraphOptions.weights). */
    weights: WeightFormat;
    device: Device;
  };
}

export async function loadModel(options: LoadModelOptions): Promise<LoadedModel> {
  const info = inspectCheckpoint(options.modelDir);
  const tokenizer = TextTokenizer.load(options.modelDir);
  const peft = options.peft ?? FULL_PEFT_LAYOUT;
  const graph: GraphOptions = {
    peft,
    rope: "contrib",
    weights: options.weights ?? "fp32",
    quantBlockSize: options.quantBlockSize,
  };
  const built = buildOrReuseGraph(info, graph, options.cacheDir);
  const runnerOptions: RunnerOptions = {
    modelPath: built.modelPath,
    spec: info.spec,
    peft,
    pools: options.pools,
    threads: options.threads,
    spin: options.spin,
  };
  const started = performance.now();
  const { backend, device } = await startBackend(runnerOptions, options);
  return {
    info,
    tokenizer,
    backend,
    report: {
      graphCacheHit: built.cacheHit,
      graphBuildMs: built.buildMs,
      staleGraphsRemoved: built.staleRemoved.length,
      sessionMs: performance.now() - started,
      parameterCount: built.parameterCount || countParameters(info),
      weightBytes: built.weightBytes,
      storedDtypes: built.storedDtypes,
      weights: graph.weights ?? "fp32",
      device,
    },
  };
}

/** Create the session on the chosen device; `auto` falls through to the next candidate on failure. */
async function startBackend(
  runnerOptions: RunnerOptions,
  options: LoadModelOptions,
): Promise<{ backend: ModelBackend; device: Device }> {
  const facts = machineFacts();
  const choice = options.device ?? "cpu";
  const candidates = candidateDevices(choice, facts);
  for (const device of candidates) {
    const withDevice = { ...runnerOptions, executionProviders: executionProviders(device) };
    try {
      const backend = options.inProcess
        ? await ModelRunner.create(withDevice)
        : await WorkerBackend.start(withDevice);
      return { backend, device };
    } catch (error) {
      if (device === "cpu" || choice !== "auto")
        throw device === "cpu" ? error : describeFailure(device, facts, error);
    }
  }
  throw describeFailure(candidates[0] ?? "cpu", facts);
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
