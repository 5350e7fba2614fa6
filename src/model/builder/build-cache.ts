/**
 * @module model/builder/build-cache — build the graph once per (checkpoint hash, builder version, options)
 * and reuse the files on restart: model.onnx + weights.bin, written to a temporary folder then renamed.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Checkpoint } from "../checkpoint.ts";
import { buildLlamaGraph, type GraphOptions } from "./llama-graph.ts";

/** Bump when the graph layout changes, so stale cached graphs are never loaded. */
export const BUILDER_VERSION = 1;

export interface BuiltGraph {
  modelPath: string;
  cacheHit: boolean;
  buildMs: number;
  weightBytes: number;
}

export function graphCacheKey(checkpoint: Checkpoint, options: GraphOptions): string {
  return createHash("sha256")
    .update(JSON.stringify({ v: BUILDER_VERSION, hash: checkpoint.contentHash, options }))
    .digest("hex")
    .slice(0, 24);
}

export function buildOrReuseGraph(
  checkpoint: Checkpoint,
  options: GraphOptions,
  cacheDir: string,
): BuiltGraph {
  const dir = join(cacheDir, graphCacheKey(checkpoint, options));
  const modelPath = join(dir, "model.onnx");
  if (existsSync(modelPath)) return { modelPath, cacheHit: true, buildMs: 0, weightBytes: 0 };
  const started = performance.now();
  mkdirSync(cacheDir, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}-${Date.now()}`;
  mkdirSync(tmp, { recursive: true });
  try {
    const { modelBytes, weightBytes } = buildLlamaGraph(checkpoint.spec, checkpoint.weights, options, {
      weightsPath: join(tmp, "weights.bin"),
      weightsFileName: "weights.bin",
    });
    writeFileSync(join(tmp, "model.onnx"), modelBytes);
    // Another process may have finished the same build meanwhile; either copy is identical.
    if (existsSync(modelPath)) rmSync(tmp, { recursive: true, force: true });
    else renameSync(tmp, dir);
    return { modelPath, cacheHit: false, buildMs: performance.now() - started, weightBytes };
  } catch (error) {
    rmSync(tmp, { recursive: true, force: true });
    throw error;
  }
}
