/**
 * @module bench/machine — measures this machine's limits through onnxruntime itself (same threads as the
 * server): streaming bandwidth (a matrix-vector product over a weight far larger than L3) and fp32 GEMM rate.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { GraphBuilder } from "../src/model/builder/graph.ts";
import { DataType } from "../src/model/builder/onnx-proto.ts";
import { makeRng } from "../src/model/maker/prng.ts";
import { ModelSession } from "../src/model/session.ts";

export interface MachineLimits {
  /** Bytes/s a batch-1 product streams weights at. */
  bandwidthBytesPerS: number;
  /** fp32 GEMM FLOP/s at a compute-bound shape. */
  gemmFlopsPerS: number;
  threads: number;
}

async function matmulSession(dir: string, name: string, k: number, n: number, threads: number) {
  const g = new GraphBuilder(`${name}.bin`);
  g.input("x", DataType.FLOAT, ["m", k]);
  // Incompressible values: this VM's host serves pages of repeating content far faster than DRAM streams (a
  // pattern repeating every 1000 floats measured 21-51 GB/s from run to run, random data a steady ~24), so a
  // periodic fill measures the host's page sharing, not the bandwidth the model's random-looking weights get.
  const rng = makeRng(k * 31 + n);
  const w = new Float32Array(k * n);
  for (let i = 0; i < w.length; i++) w[i] = (rng.uniform() - 0.5) * 0.04;
  const y = g.op1("MatMul", ["x", g.weight("w", [k, n], w)]);
  g.output("y", y, DataType.FLOAT, ["m", n]);
  const bytes = g.finish({
    weightsPath: join(dir, `${name}.bin`),
    opsets: [{ domain: "", version: 21 }],
    graphName: name,
  });
  writeFileSync(join(dir, `${name}.onnx`), bytes);
  return ModelSession.create(join(dir, `${name}.onnx`), { threads });
}

async function bestTime(fn: () => Promise<unknown>, reps: number): Promise<number> {
  await fn();
  let best = Number.POSITIVE_INFINITY;
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await fn();
    best = Math.min(best, performance.now() - t0);
  }
  return best / 1000;
}

export async function measureMachine(threads: number): Promise<MachineLimits> {
  const dir = mkdtempSync(join(tmpdir(), "taskmux-machine-"));
  try {
    // 4096 x 16384 fp32 = 256 MiB: far beyond any cache, so M=1 measures DRAM streaming.
    const K = 4096;
    const N = 16384;
    const stream = await matmulSession(dir, "stream", K, N, threads);
    const x1 = new Float32Array(K).fill(0.5);
    const tStream = await bestTime(
      () => stream.run({ x: { type: "float32", data: x1, dims: [1, K] } }, ["y"]),
      5,
    );
    await stream.dispose();
    const M = 512;
    const KG = 1024;
    const NG = 1024;
    const gemm = await matmulSession(dir, "gemm", KG, NG, threads);
    const xg = new Float32Array(M * KG).fill(0.25);
    const tGemm = await bestTime(
      () => gemm.run({ x: { type: "float32", data: xg, dims: [M, KG] } }, ["y"]),
      5,
    );
    await gemm.dispose();
    return { bandwidthBytesPerS: (K * N * 4) / tStream, gemmFlopsPerS: (2 * M * KG * NG) / tGemm, threads };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The higher of several measurements, field by field. A roofline is an upper bound, and on a shared machine a
 * measurement can only come out low (a neighbour took the bus or a core for a second, as one run's 21.5 GB/s
 * against the usual 29-34 showed), so the benches measure before and after and keep the best.
 */
export function strongest(first: MachineLimits, ...others: MachineLimits[]): MachineLimits {
  return others.reduce(
    (a, b) => ({
      bandwidthBytesPerS: Math.max(a.bandwidthBytesPerS, b.bandwidthBytesPerS),
      gemmFlopsPerS: Math.max(a.gemmFlopsPerS, b.gemmFlopsPerS),
      threads: a.threads,
    }),
    first,
  );
}
