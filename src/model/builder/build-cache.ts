/**
 * @module model/builder/build-cache — build the graph once per (checkpoint hash, builder version, options)
 * and reuse the files on restart: model.onnx + weights.bin, written to a temporary folder then renamed.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { basename, join } from "node:path";
import { type Checkpoint, type CheckpointInfo, loadCheckpoint } from "../checkpoint.ts";
import { buildLlamaGraph, type GraphOptions } from "./llama-graph.ts";
import { bitsOf, QUANT_BLOCK_SIZE } from "./quantize.ts";

/**
 * Bump when the graph layout changes, so stale cached graphs are never loaded. (22: the cache key gained the
 * builder's source fingerprint; the bump lets the pruning below clear version 21's entries, keyed without it.)
 */
export const BUILDER_VERSION = 22;

/** The modules whose text decides the graph a checkpoint builds into. */
const BUILDER_SOURCES = [
  "./llama-graph.ts",
  "./graph.ts",
  "./onnx-proto.ts",
  "./quantize.ts",
  "../contract.ts",
  "../model-spec.ts",
];

/**
 * A hash of the builder's own source text, part of every cache key, so an edited builder never loads the graph
 * the code before the edit built (a bump of BUILDER_VERSION forgotten while developing once served, tested and
 * benchmarked a stale graph without a word). Empty when the sources are not beside this module (a bundle):
 * the version alone keys the cache then.
 */
export const BUILDER_FINGERPRINT = sourceFingerprint();

function sourceFingerprint(): string {
  const hash = createHash("sha256");
  for (const source of BUILDER_SOURCES) {
    try {
      hash.update(readFileSync(new URL(source, import.meta.url)));
    } catch {
      return "";
    }
  }
  return hash.digest("hex").slice(0, 16);
}

export interface BuiltGraph {
  modelPath: string;
  cacheHit: boolean;
  buildMs: number;
  weightBytes: number;
  /** Parameters of the checkpoint (0 on a cache hit: the weights were never read). */
  parameterCount: number;
  storedDtypes: string[];
  /** Cached graphs of older builder versions this build removed (see pruneStaleGraphs). */
  staleRemoved: string[];
}

/** Written beside each built graph: which builder made it, so a newer taskmux can tell its leftovers. */
const BUILD_INFO = "build.json";
const CACHE_ENTRY = /^[0-9a-f]{24}$/;

/**
 * Remove cached graphs that an older builder version made (no build.json, or a lower version), or this version
 * from other builder source text (an edited checkout): a graph is hundreds of MB and every builder version keys
 * new ones, so upgrades would otherwise pile them up. Entries of newer versions, in-progress builds (".tmp-"
 * names) and anything not named like a cache key are kept.
 * A server still running an old graph keeps its open, memory-mapped files (unlinking does not unmap them).
 */
export function pruneStaleGraphs(cacheDir: string, keep: string): string[] {
  const removed: string[] = [];
  let entries: string[];
  try {
    entries = readdirSync(cacheDir);
  } catch {
    return removed;
  }
  for (const name of entries) {
    if (name === keep || !CACHE_ENTRY.test(name)) continue;
    const dir = join(cacheDir, name);
    let version = 0;
    let fingerprint: string | undefined;
    try {
      const info = JSON.parse(readFileSync(join(dir, BUILD_INFO), "utf8")) as {
        builderVersion?: number;
        builderFingerprint?: string;
      };
      version = info.builderVersion ?? 0;
      fingerprint = info.builderFingerprint;
    } catch {
      // No readable build.json: made before build.json existed, so by an older builder.
    }
    const otherSource =
      version === BUILDER_VERSION &&
      fingerprint !== undefined &&
      BUILDER_FINGERPRINT !== "" &&
      fingerprint !== BUILDER_FINGERPRINT;
    if ((version >= BUILDER_VERSION && !otherSource) || !existsSync(join(dir, "model.onnx"))) continue;
    rmSync(dir, { recursive: true, force: true });
    removed.push(name);
  }
  return removed;
}

export function graphCacheKey(
  checkpoint: Pick<CheckpointInfo, "contentHash">,
  options: GraphOptions,
  builderFingerprint = BUILDER_FINGERPRINT,
): string {
  return createHash("sha256")
    .update(
      JSON.stringify({
        v: BUILDER_VERSION,
        source: builderFingerprint,
        hash: checkpoint.contentHash,
        // The weight format is part of the key; absent means fp32. The block size is left out where it changes
        // nothing (float formats) and at its default, so one graph is not built twice under two keys.
        options: {
          ...options,
          weights: options.weights ?? "fp32",
          quantBlockSize:
            bitsOf(options.weights ?? "fp32") !== null &&
            (options.quantBlockSize ?? QUANT_BLOCK_SIZE) !== QUANT_BLOCK_SIZE
              ? options.quantBlockSize
              : undefined,
        },
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
    return {
      modelPath,
      cacheHit: true,
      buildMs: 0,
      weightBytes: 0,
      parameterCount: 0,
      storedDtypes: [],
      staleRemoved: [],
    };
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
    writeFileSync(
      join(tmp, BUILD_INFO),
      `${JSON.stringify({ builderVersion: BUILDER_VERSION, builderFingerprint: BUILDER_FINGERPRINT, options })}\n`,
    );
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
      // A fresh build is when an upgrade shows: clear what older builders left.
      staleRemoved: pruneStaleGraphs(cacheDir, basename(dir)),
    };
  } catch (error) {
    rmSync(tmp, { recursive: true, force: true });
    throw error;
  }
}
