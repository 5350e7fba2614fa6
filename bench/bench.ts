/**
 * @module bench/bench — `npm run bench`: serving throughput and latency of taskmux on the smollm2-135m
 * preset at several concurrencies, each figure also shown as a fraction of this machine's limits
 * (measured in the same run). Writes bench/results/<time>.json and prints a table.
 *
 *   npm run bench -- [--concurrency 1,8,32] [--prompt-tokens 128] [--max-tokens 128] [--threads N]
 *                    [--preset smollm2-135m] [--requests-per-client 2] [--staggered]
 *     --staggered: each request asks for its own max_tokens, spread over [max/8, max], so streams finish and
 *     new ones join at different steps (steady traffic) instead of all together
 *   npm run bench -- --compare-llamacpp [--reps 3] [--threads N] [--pairs fp32,int4,...]
 *                                                                  (taskmux vs node-llama-cpp: bench/compare-llamacpp.ts)
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import { countParameters } from "../src/model/load-model.ts";
import { makeModel, PRESETS, type PresetName } from "../src/model/maker/make-model.ts";
import { compareWithLlamaCpp } from "./compare-llamacpp.ts";
import { percentile, runLoad, steadyDecodeTokS } from "./load.ts";
import { measureMachine, strongest } from "./machine.ts";
import { startServer } from "./server-process.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));

const { values } = parseArgs({
  options: {
    preset: { type: "string", default: "smollm2-135m" },
    concurrency: { type: "string", default: "1,8,32" },
    "prompt-tokens": { type: "string", default: "128" },
    "max-tokens": { type: "string", default: "128" },
    "requests-per-client": { type: "string", default: "2" },
    staggered: { type: "boolean", default: false },
    threads: { type: "string", default: String(availableParallelism()) },
    "compare-llamacpp": { type: "boolean", default: false },
    reps: { type: "string", default: "3" },
    pairs: { type: "string" },
  },
});

const preset = values.preset as PresetName;
if (!(preset in PRESETS)) throw new Error(`--preset must be one of ${Object.keys(PRESETS).join(", ")}`);
const concurrencies = values.concurrency.split(",").map(Number);
const promptTokens = Number(values["prompt-tokens"]);
const maxTokens = Number(values["max-tokens"]);
const requestsPerClient = Number(values["requests-per-client"]);
/** Deterministic per-request lengths in [maxTokens / 8, maxTokens] under --staggered. */
const requestMaxTokens = values.staggered
  ? (client: number, i: number) => {
      const low = Math.max(1, Math.ceil(maxTokens / 8));
      return low + ((client * 37 + i * 101) % (maxTokens - low + 1));
    }
  : maxTokens;
const threads = Number(values.threads);

function log(msg: string) {
  process.stderr.write(`[bench] ${msg}\n`);
}

function ensureModel(): string {
  const dir = join(BENCH_DIR, ".models", `${preset}-seed0`);
  if (!existsSync(join(dir, "config.json"))) {
    log(`making the ${preset} model (deterministic, seed 0) in ${dir}`);
    makeModel({ preset, seed: 0, out: dir });
  }
  return dir;
}

/** Deterministic prompt ids below the special tokens (the made tokenizers put specials last). */
function promptIds(vocab: number, client: number, i: number): number[] {
  return Array.from(
    { length: promptTokens },
    (_, t) => 256 + ((client * 7919 + i * 104729 + t * 131) % (vocab - 512)),
  );
}

async function main() {
  const modelDir = ensureModel();
  const info = inspectCheckpoint(modelDir);
  const params = countParameters(info);
  const weightBytes = params * 4;
  log(`measuring machine limits with ${threads} threads`);
  const machine = await measureMachine(threads);
  log(
    `bandwidth ${(machine.bandwidthBytesPerS / 1e9).toFixed(1)} GB/s, GEMM ${(machine.gemmFlopsPerS / 1e9).toFixed(0)} GFLOP/s`,
  );
  if (values["compare-llamacpp"]) {
    await compareWithLlamaCpp({
      modelDir,
      threads,
      machine,
      reps: Number(values.reps),
      promptTokens,
      gen: maxTokens,
      concurrencies: concurrencies.filter((c) => c > 1),
      pairs: values.pairs?.split(","),
      maxForeign: 0.25,
      outDir: join(BENCH_DIR, "results"),
    });
    return;
  }
  const maxSeqs = Math.max(...concurrencies);
  const server = await startServer([
    "--model",
    modelDir,
    "--threads",
    String(threads),
    "--max-num-seqs",
    String(Math.max(32, maxSeqs)),
    "--max-batched-tokens",
    String(Math.max(256, maxSeqs)),
  ]);
  const levels = [];
  try {
    for (const c of concurrencies) {
      log(
        `concurrency ${c}: ${c * requestsPerClient} requests of ${promptTokens} + ${values.staggered ? `${Math.ceil(maxTokens / 8)}..` : ""}${maxTokens} tokens`,
      );
      const r = await runLoad({
        baseUrl: server.baseUrl,
        concurrency: c,
        requestsPerClient,
        prompt: (client, i) => promptIds(info.spec.vocabSize, client, i),
        maxTokens: requestMaxTokens,
      });
      const throughput = r.completionTokens / r.wallS;
      // Aggregate decode: tokens/s while all c streams decode (prefill steps that start streams excluded).
      // (--staggered streams never all decode at once: no such window, so no figure.)
      const steady = steadyDecodeTokS(r);
      const decodeTokS = Number.isFinite(steady) ? steady : null;
      // The streams' own decode rates, summed: a stream's rate also absorbs the prefill steps of the others
      // that start while it decodes (they interleave with decode steps), so this one is lower.
      const streamDecodeSumTokS =
        r.decodeRates.reduce((a, b) => a + b, 0) * (requestsPerClient > 1 ? 1 / requestsPerClient : 1);
      levels.push({
        concurrency: c,
        requests: r.requests,
        errors: r.errors,
        wallS: r.wallS,
        generatedTokens: r.completionTokens,
        throughputTokS: throughput,
        decodeTokS,
        streamDecodeSumTokS,
        ttftMsP50: percentile(r.ttftMs, 50),
        ttftMsP99: percentile(r.ttftMs, 99),
        itlMsP50: percentile(r.itlMs, 50),
        itlMsP99: percentile(r.itlMs, 99),
        serverRssMiB: server.rssBytes() / 2 ** 20,
      });
    }
  } finally {
    await server.stop();
  }
  log("measuring machine limits again");
  const after = await measureMachine(threads);
  const best = strongest(machine, after);
  const rooflineDecodeTokS = best.bandwidthBytesPerS / weightBytes;
  const base = levels.find((l) => l.concurrency === 1);
  const roofline = (c: number, throughput: number) => {
    const rooflineTokS = Math.min(c * rooflineDecodeTokS, best.gemmFlopsPerS / (2 * params));
    return { rooflineTokS, fractionOfRoofline: throughput / rooflineTokS };
  };
  const report = {
    date: new Date().toISOString(),
    preset,
    parameters: params,
    weightBytesPerDecodeStep: weightBytes,
    threads,
    promptTokens,
    maxTokens,
    staggered: values.staggered,
    machine: {
      bandwidthGBs: best.bandwidthBytesPerS / 1e9,
      gemmGflops: best.gemmFlopsPerS / 1e9,
      batch1DecodeRooflineTokS: rooflineDecodeTokS,
      measured: [machine, after].map((m) => ({
        bandwidthGBs: m.bandwidthBytesPerS / 1e9,
        gemmGflops: m.gemmFlopsPerS / 1e9,
      })),
    },
    levels: levels.map((l) => ({
      ...l,
      // Batch-c decode streams the weights once per step for c tokens: the roofline is c x batch-1's,
      // capped by compute (2 FLOP per parameter per token).
      ...roofline(l.concurrency, l.throughputTokS),
      speedupVsConcurrency1: base ? l.throughputTokS / base.throughputTokS : null,
      decodeSpeedupVsConcurrency1:
        base && l.decodeTokS !== null && base.decodeTokS !== null ? l.decodeTokS / base.decodeTokS : null,
      streamDecodeSumSpeedupVsConcurrency1: base ? l.streamDecodeSumTokS / base.streamDecodeSumTokS : null,
    })),
  };
  const outDir = join(BENCH_DIR, "results");
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, `serving-${report.date.replace(/[:.]/g, "-")}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  printTable(report);
  log(`wrote ${file}`);
}

function printTable(
  report: { machine: Record<string, unknown>; levels: Record<string, number | null>[] } & Record<
    string,
    unknown
  >,
) {
  const m = report.machine as Record<string, number>;
  console.log(
    `\ntaskmux serving benchmark — ${report.preset}, ${report.parameters} params, ${report.threads} threads, prompt ${report.promptTokens} + ${report.maxTokens} new tokens`,
  );
  console.log(
    `machine: ${m.bandwidthGBs!.toFixed(1)} GB/s streaming, ${m.gemmGflops!.toFixed(0)} GFLOP/s fp32 GEMM; batch-1 decode roofline ${m.batch1DecodeRooflineTokS!.toFixed(1)} tok/s\n`,
  );
  const rows = report.levels.map((l) => ({
    conc: l.concurrency,
    "tok/s": l.throughputTokS!.toFixed(1),
    "x conc1": l.speedupVsConcurrency1?.toFixed(2) ?? "-",
    "decode tok/s": l.decodeTokS?.toFixed(1) ?? "-",
    "decode x conc1": l.decodeSpeedupVsConcurrency1?.toFixed(2) ?? "-",
    "stream-sum x conc1": l.streamDecodeSumSpeedupVsConcurrency1?.toFixed(2) ?? "-",
    roofline: l.rooflineTokS!.toFixed(0),
    "% roof": `${(100 * l.fractionOfRoofline!).toFixed(0)}%`,
    "ttft p50": l.ttftMsP50!.toFixed(0),
    "ttft p99": l.ttftMsP99!.toFixed(0),
    "itl p50": l.itlMsP50!.toFixed(1),
    "itl p99": l.itlMsP99!.toFixed(1),
    errors: l.errors,
    "rss MiB": l.serverRssMiB!.toFixed(0),
  }));
  console.table(rows);
}

await main();
