/**
 * @module model/builder/build-cache — build the graph once per (checkpoint hash, builder version, options)
 * and reuse the files on restart: model.onnx + weights.bin, written to a temporary folder then renamed.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Checkpoint, type CheckpointInfo, loadCheckpoint } from "../checkpoint.ts";
import { buildLlamaGraph, type GraphOptions } from "./llama-graph.ts";

/** Bump when the graph layout changes, so stale cached graphs are never loaded. */
export const BUILDER_VERSION = 9;

export interface BuiltGraph {
  modelPath: string;
  cacheHit: boolean;
  buildMs: number;
  weightBytes: number;
  /** Parameters of the checkpoint (0 on a cache hit: the weights were never read). */
  parameterCount: number;
  storedDtypes: string[];
}

export function graphCacheKey(
  checkpoint: Pick<CheckpointInfo, "contentHash">,
  options: GraphOptions,
): string {
  return createHash("sha256")
    .update(
      JSON.stringify({
        v: BUILDER_VERSION,
        hash: checkpoint.contentHash,
        // The weight format is part of the key; absent means fp32.
        options: { ...options, weights: options.weights ?? "fp32" },
      }),
    )
    .digest("hex")
    .slice(0, 24);
}

/**
 * `checkpoint` is either loaded weights (tests build graphs of made-up models) or just its info, in which
 * case the weights are read only on a cache miss.
 */
export function buildOrReuseGraph(
  checkpoint: CheckpointInfo | Checkpoint,
  options: GraphOptions,
  cacheDir: string,
): BuiltGraph {
  const dir = join(cacheDir, graphCacheKey(checkpoint, options));
  const modelPath = join(dir, "model.onnx");
  if (existsSync(modelPath)) {
    return { modelPath, cacheHit: true, buildMs: 0, weightBytes: 0, parameterCount: 0, storedDtypes: [] };
  }
  const started = performance.now();
  const loaded = "weights" in checkpoint ? checkpoint : loadCheckpoint(checkpoint.dir, checkpoint);
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
  mkdirSync(tmp, { recursive: true });
  try {
    const { modelBytes, weightBytes } = buildLlamaGraph(loaded.spec, loaded.weights, options, {
      weightsPath: join(tmp, "weights.bin"),
      weightsFileName: "weights.bin",
    });
    writeFileSync(join(tmp, "model.onnx"), modelBytes);
    // Another process may have finished the same build meanwhile; either copy is identical.
    if (existsSync(modelPath)) rmSync(tmp, { recursive: true, force: true });
    else renameSync(tmp, dir);
    return {
      modelPath,
      cacheHit: false,
      buildMs: performance.now() - started,
      weightBytes,
      parameterCount: loaded.parameterCount,
      storedDtypes: loaded.storedDtypes,
    };
  } catch (error) {
    rmSync(tmp, { recursive: true, force: true });
    throw error;
  }
}
