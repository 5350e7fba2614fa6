/**
 * @module bench/weight-formats — what each `--weights` format costs in accuracy and buys in speed, measured in one
 * run (the table in docs/weight-formats.md):
 *
 *   node --import tsx bench/weight-formats.ts [--models smollm2-135m,stories260k] [--formats fp32,fp16,int8,int4,int4@128]
 *                                             [--threads 2] [--reps 3] [--gen 64]
 *
 * For each model, one token sequence is fixed: a prompt plus the fp32 graph's own greedy continuation
 * (stories260k: expected.json's longest prompt and its recorded continuation). Every format then reads that same
 * sequence (prefill of the prompt, then one decode step per continuation token, teacher-forced), and at every
 * position compares with fp32: |Δ logprob| of fp32's greedy token, and whether its own argmax agrees. Batch-1 decode
 * tok/s (runner level: the steps' own time, no sampling or HTTP) is the median over --reps passes of --gen decode
 * steps, the formats interleaved pass by pass. File size is the built graph's weights.bin + model.onnx.
 */
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { configSchema } from "../src/config.ts";
import { argmax } from "../src/engine/sampler.ts";
import { buildStep } from "../src/engine/step-builder.ts";
import { buildOrReuseGraph } from "../src/model/builder/build-cache.ts";
import {
  QUANT_BLOCK_SIZES,
  type QuantBlockSize,
  WEIGHT_FORMATS,
  type WeightFormat,
} from "../src/model/builder/quantize.ts";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import type { PeftLayout } from "../src/model/contract.ts";
import { makeModel } from "../src/model/maker/make-model.ts";
import { logSoftmax } from "../src/model/reference.ts";
import { logitsOf, ModelRunner } from "../src/model/runner.ts";
import { cpuTicks, foreignCores, promptIds } from "./compare-llamacpp.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));
const SHARED_MODELS = join(BENCH_DIR, "..", "..", "shared", "models");

const { values } = parseArgs({
  options: {
    models: { type: "string", default: "smollm2-135m,stories260k" },
    // FORMAT or FORMAT@BLOCK (an int format at a non-default quantisation block size).
    formats: { type: "string", default: [...WEIGHT_FORMATS, "int4@128"].join(",") },
    threads: { type: "string", default: String(availableParallelism()) },
    reps: { type: "string", default: "3" },
    gen: { type: "string", default: "64" },
    "prompt-tokens": { type: "string", default: "128" },
  },
});

/** One measured graph: a weight format, and for int formats optionally its block size; `label` names it. */
interface Variant {
  label: string;
  weights: WeightFormat;
  quantBlockSize?: QuantBlockSize;
}
const formats: Variant[] = values.formats.split(",").map((label) => {
  const [weights, block] = label.split("@") as [WeightFormat, string | undefined];
  if (!WEIGHT_FORMATS.includes(weights)) throw new Error(`unknown format ${label}`);
  const quantBlockSize = block === undefined ? undefined : (Number(block) as QuantBlockSize);
  if (
    quantBlockSize !== undefined &&
    (!weights.startsWith("int") || !QUANT_BLOCK_SIZES.includes(quantBlockSize))
  )
    throw new Error(
      `${label}: a block size applies to int8/int4 and is one of ${QUANT_BLOCK_SIZES.join(", ")}`,
    );
  return { label, weights, quantBlockSize };
});
if (!formats.some((f) => f.label === "fp32")) throw new Error("--formats must include fp32 (the reference)");
const threads = Number(values.threads);
const reps = Number(values.reps);
const gen = Number(values.gen);
const promptTokens = Number(values["prompt-tokens"]);
// The PEFT paths are built as the server builds them (full layout), so the speed is the server's.
const PEFT: PeftLayout = {
  loraTargets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  ia3Targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
  bottleneck: true,
};
const POOLS = { loraSlots: 8, maxLoraRank: 16, ia3Slots: 8, bottleneckSlots: 8, maxBottleneckSize: 64 };
const blank = { loraSlot: 0, ia3Slot: 0, bottleneckSlot: 0 };

function log(msg: string) {
  process.stderr.write(`[weight-formats] ${msg}\n`);
}

/** Model dir and its fixed sequence split (prompt, continuation); the continuation may be filled in later. */
function modelCase(name: string): { dir: string; prompt: number[]; continuation: number[] | null } | null {
  if (name === "stories260k") {
    const dir = join(SHARED_MODELS, "stories260k");
    if (!existsSync(join(dir, "expected.json"))) return null;
    const expected = JSON.parse(readFileSync(join(dir, "expected.json"), "utf8")) as {
      cases: { prompt_ids: number[]; completion_ids: number[] }[];
    };
    const c = expected.cases.reduce((a, b) => (b.prompt_ids.length > a.prompt_ids.length ? b : a));
    return { dir, prompt: c.prompt_ids, continuation: c.completion_ids.slice(0, gen) };
  }
  const dir = join(BENCH_DIR, ".models", `${name}-seed0`);
  if (!existsSync(join(dir, "config.json"))) {
    log(`making the ${name} model in ${dir}`);
    makeModel({ preset: name as "smollm2-135m", seed: 0, out: dir });
  }
  const vocab = inspectCheckpoint(dir).spec.vocabSize;
  return { dir, prompt: promptIds(vocab, promptTokens), continuation: null };
}

interface Pass {
  /** [positions, vocab] logprobs */
  logprobs: Float64Array[];
  decodeMs: number;
  /** cores other processes used during the pass */
  foreign: number;
}

/** Prefill `prompt` (all logits), then one decode step per continuation token; logprobs at every position. */
async function teacherForced(
  runner: ModelRunner,
  vocab: number,
  hidden: number,
  seq: number[],
  promptLength: number,
  seqId: number,
): Promise<Pass> {
  const logprobs: Float64Array[] = [];
  const ticks = cpuTicks();
  const pre = buildStep(
    [{ seqId, tokens: seq.slice(0, promptLength), pastLength: 0, logits: "all", ...blank }],
    vocab,
    hidden,
  );
  const out = await runner.forward(pre.batch);
  for (let t = 0; t < promptLength; t++)
    logprobs.push(logSoftmax(logitsOf(out).subarray(t * vocab, (t + 1) * vocab)));
  // Only the steps themselves are timed (building the batch + forward), not the logprob bookkeeping.
  let decodeMs = 0;
  for (let p = promptLength; p < seq.length; p++) {
    const t0 = performance.now();
    const step = buildStep(
      [{ seqId, tokens: [seq[p]!], pastLength: p, logits: "last", ...blank }],
      vocab,
      hidden,
    );
    const o = await runner.forward(step.batch);
    decodeMs += performance.now() - t0;
    logprobs.push(logSoftmax(logitsOf(o).subarray(0, vocab)));
  }
  runner.release([seqId]);
  return { logprobs, decodeMs, foreign: foreignCores(ticks, cpuTicks()) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;

async function measureModel(name: string) {
  const c = modelCase(name);
  if (!c) {
    log(`${name}: not present, skipped`);
    return null;
  }
  const info = inspectCheckpoint(c.dir);
  const { vocabSize: V, hiddenSize: D } = info.spec;
  const cacheDir = configSchema.parse({}).cacheDir;
  const runners = new Map<string, ModelRunner>();
  const sizes = new Map<string, number>();
  for (const { label: f, weights, quantBlockSize } of formats) {
    const built = buildOrReuseGraph(info, { peft: PEFT, rope: "contrib", weights, quantBlockSize }, cacheDir);
    const graphDir = dirname(built.modelPath);
    sizes.set(f, statSync(join(graphDir, "weights.bin")).size + statSync(built.modelPath).size);
    runners.set(
      f,
      await ModelRunner.create({
        modelPath: built.modelPath,
        spec: info.spec,
        peft: PEFT,
        pools: POOLS,
        threads,
      }),
    );
    log(
      `${name} ${f}: graph ${built.cacheHit ? "cached" : `built in ${(built.buildMs / 1000).toFixed(1)} s`}`,
    );
  }
  let seqId = 1;
  // The fixed sequence: the fp32 greedy continuation when none is recorded.
  const ref = runners.get("fp32")!;
  let continuation = c.continuation;
  if (!continuation) {
    continuation = [];
    const seq = [...c.prompt];
    const id = seqId++;
    let out = await ref.forward(
      buildStep([{ seqId: id, tokens: seq, pastLength: 0, logits: "last", ...blank }], V, D).batch,
    );
    for (let i = 0; i < gen; i++) {
      const next = argmax(logitsOf(out).subarray(0, V));
      continuation.push(next);
      seq.push(next);
      if (i + 1 < gen)
        out = await ref.forward(
          buildStep(
            [{ seqId: id, tokens: [next], pastLength: seq.length - 1, logits: "last", ...blank }],
            V,
            D,
          ).batch,
        );
    }
    ref.release([id]);
  }
  const seq = [...c.prompt, ...continuation];
  // Positions 0..n-2 predict tokens 1..n-1; the last position's prediction is compared too.
  const labels = formats.map((f) => f.label);
  const passes = new Map<string, Pass[]>();
  for (const f of labels) passes.set(f, []);
  for (let r = 0; r < reps; r++) {
    for (const f of r % 2 ? [...labels].reverse() : labels) {
      passes.get(f)!.push(await teacherForced(runners.get(f)!, V, D, seq, c.prompt.length, seqId++));
    }
  }
  const base = passes.get("fp32")![0]!.logprobs;
  const rows = labels.map((f) => {
    const lp = passes.get(f)![0]!.logprobs;
    let sum = 0;
    let max = 0;
    let agree = 0;
    for (let p = 0; p < base.length; p++) {
      const greedy = argmax(Float32Array.from(base[p]!));
      const d = Math.abs(lp[p]![greedy]! - base[p]![greedy]!);
      sum += d;
      max = Math.max(max, d);
      if (argmax(Float32Array.from(lp[p]!)) === greedy) agree++;
    }
    const decodeTokS = median(passes.get(f)!.map((p) => continuation.length / (p.decodeMs / 1000)));
    return {
      format: f,
      fileBytes: sizes.get(f)!,
      positions: base.length,
      meanAbsDeltaLogprob: sum / base.length,
      maxAbsDeltaLogprob: max,
      greedyAgreement: agree / base.length,
      batch1DecodeTokS: decodeTokS,
      allDecodeTokS: passes.get(f)!.map((p) => continuation.length / (p.decodeMs / 1000)),
      foreignCores: passes.get(f)!.map((p) => p.foreign),
    };
  });
  for (const r of runners.values()) await r.dispose();
  return {
    model: name,
    dir: c.dir,
    promptTokens: c.prompt.length,
    continuationTokens: continuation.length,
    rows,
  };
}

async function main() {
  const results = [];
  for (const name of values.models.split(",")) {
    const r = await measureModel(name);
    if (r) results.push(r);
  }
  const report = { date: new Date().toISOString(), threads, reps, results };
  const outDir = join(BENCH_DIR, "results");
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, `weight-formats-${report.date.replace(/[:.]/g, "-")}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  for (const r of results) {
    console.log(
      `\n${r.model}: ${r.promptTokens + r.continuationTokens} positions (prompt ${r.promptTokens} + ${r.continuationTokens} teacher-forced decode steps), ${threads} threads, ${reps} interleaved passes`,
    );
    console.log(
      "| format | file size | mean abs Δ logprob | max abs Δ logprob | greedy agreement | batch-1 decode tok/s | others' CPU (cores, max) |",
    );
    console.log("|---|---:|---:|---:|---:|---:|---:|");
    for (const row of r.rows) {
      console.log(
        `| ${row.format} | ${(row.fileBytes / 2 ** 20).toFixed(1)} MiB | ${row.meanAbsDeltaLogprob.toExponential(2)} | ${row.maxAbsDeltaLogprob.toExponential(2)} | ${(100 * row.greedyAgreement).toFixed(1)}% | ${row.batch1DecodeTokS.toFixed(1)} | ${Math.max(...row.foreignCores).toFixed(2)} |`,
      );
    }
  }
  log(`wrote ${file}`);
}

await main();
