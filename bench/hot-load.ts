/**
 * @module bench/hot-load — `npm run bench:hot-load`: how long a task takes from the rename of its folder into
 * `adapters/` to the first successful request that uses it. 20 loads of a rank-16 PEFT LoRA on q, k, v, o of
 * the smollm2-135m preset, the server running as a child process, timed two ways:
 *
 *   watch    the watcher alone loads it: poll GET /v1/tasks/{name} (admin API) until ready, then one request
 *   request  send requests at once: the first one may find the folder before the watcher does (on-demand load)
 *
 * Each folder is written under `.tmp-<name>` before its timing starts (the publishing pattern the README gives),
 * so the time covers noticing the rename, parsing and validating the files, publishing the version, writing
 * the pool slot and one 1-token request. Prints p50 / max and writes bench/results/hot-load-<time>.json.
 *
 *   npm run bench:hot-load -- [--loads 20] [--rank 16] [--threads N] [--preset smollm2-135m]
 */
import { mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { loraTask, writeTaskFiles } from "../scripts/make-examples.ts";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import type { Projection } from "../src/model/contract.ts";
import { PRESETS, type PresetName } from "../src/model/maker/make-model.ts";
import { makeRng } from "../src/model/maker/prng.ts";
import { percentile } from "./load.ts";
import { ensureBenchModel } from "./models.ts";
import { startServer } from "./server-process.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));
const TARGETS: Projection[] = ["q_proj", "k_proj", "v_proj", "o_proj"];

const { values } = parseArgs({
  options: {
    preset: { type: "string", default: "smollm2-135m" },
    loads: { type: "string", default: "20" },
    rank: { type: "string", default: "16" },
    threads: { type: "string", default: String(availableParallelism()) },
  },
});
const preset = values.preset as PresetName;
if (!(preset in PRESETS)) throw new Error(`--preset must be one of ${Object.keys(PRESETS).join(", ")}`);
const numLoads = Number(values.loads);
const rank = Number(values.rank);

const log = (msg: string) => process.stderr.write(`[bench:hot-load] ${msg}\n`);

async function firstOk(baseUrl: string, name: string): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    const res = await fetch(`${baseUrl}/v1/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Task": name },
      body: JSON.stringify({ prompt: [256, 300, 400, 500], max_tokens: 1, temperature: 0 }),
    });
    await res.arrayBuffer();
    if (res.ok) return attempt;
    if (res.status !== 404 || attempt > 10_000) throw new Error(`${name}: ${res.status}`);
  }
}

async function untilReady(baseUrl: string, name: string): Promise<void> {
  for (let i = 0; ; i++) {
    const res = await fetch(`${baseUrl}/v1/tasks/${name}`);
    const body = (await res.json()) as { status?: string; error?: string | null };
    if (res.ok && body.status === "ready") return;
    if (res.ok && body.status === "failed") throw new Error(`${name} failed to load: ${body.error}`);
    if (i > 100_000) throw new Error(`${name} never became ready`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

async function main() {
  const modelDir = ensureBenchModel(preset, log);
  const { spec } = inspectCheckpoint(modelDir);
  const work = mkdtempSync(join(tmpdir(), "taskmux-hot-load-"));
  const adapters = join(work, "adapters");
  const promptTables = join(work, "prompt-tables");
  mkdirSync(adapters);
  mkdirSync(promptTables);
  const modes = ["watch", "request"] as const;
  let adapterBytes = 0;
  for (const mode of modes)
    for (let i = 0; i < numLoads; i++)
      adapterBytes = writeTaskFiles(
        join(adapters, `.tmp-${mode}-${i}`),
        loraTask(spec, makeRng(1000 + i), modelDir, rank, TARGETS),
      );
  log(
    `${2 * numLoads} LoRA folders of ${(adapterBytes / 2 ** 20).toFixed(1)} MiB written; starting the server`,
  );
  const server = await startServer([
    "--model",
    modelDir,
    "--adapters",
    adapters,
    "--prompt-tables",
    promptTables,
    "--threads",
    values.threads,
    "--max-lora-rank",
    String(rank),
    "--max-resident-adapters",
    "4",
  ]);
  const ms: Record<(typeof modes)[number], number[]> = { watch: [], request: [] };
  /** watch mode split: rename -> ready (notice + load + publish), ready -> first ok (slot write + request) */
  const split = { readyMs: [] as number[], firstRequestMs: [] as number[], warmRequestMs: [] as number[] };
  try {
    await new Promise((r) => setTimeout(r, 500)); // the prepared folders' files are quiet by now
    for (let i = 0; i < numLoads; i++) {
      for (const mode of modes) {
        const name = `${mode}-${i}`;
        const started = performance.now();
        renameSync(join(adapters, `.tmp-${name}`), join(adapters, name));
        if (mode === "watch") await untilReady(server.baseUrl, name);
        const ready = performance.now();
        await firstOk(server.baseUrl, name);
        ms[mode].push(performance.now() - started);
        if (mode === "watch") {
          split.readyMs.push(ready - started);
          split.firstRequestMs.push(performance.now() - ready);
          const warm = performance.now();
          await firstOk(server.baseUrl, name);
          split.warmRequestMs.push(performance.now() - warm);
        }
      }
    }
  } finally {
    await server.stop();
    rmSync(work, { recursive: true, force: true });
  }
  const summary = (values: number[]) => ({
    p50Ms: percentile(values, 50),
    maxMs: Math.max(...values),
    ms: values,
  });
  const report = {
    date: new Date().toISOString(),
    preset,
    loads: numLoads,
    lora: { rank, alpha: 2 * rank, targets: TARGETS, layers: spec.numLayers, sizeBytes: adapterBytes },
    threads: Number(values.threads),
    watch: summary(ms.watch),
    request: summary(ms.request),
    watchSplit: {
      renameToReady: summary(split.readyMs),
      readyToFirstOk: summary(split.firstRequestMs),
      warmRequest: summary(split.warmRequestMs),
    },
  };
  const outDir = join(BENCH_DIR, "results");
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, `hot-load-${report.date.replace(/[:.]/g, "-")}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  console.log(
    `\ntaskmux hot-load benchmark — ${preset}, rank-${rank} LoRA on q,k,v,o (${(adapterBytes / 2 ** 20).toFixed(1)} MiB), ${numLoads} loads each`,
  );
  console.table({
    "rename -> watcher ready -> first request": {
      p50: report.watch.p50Ms.toFixed(1),
      max: report.watch.maxMs.toFixed(1),
    },
    "  of which rename -> ready": {
      p50: report.watchSplit.renameToReady.p50Ms.toFixed(1),
      max: report.watchSplit.renameToReady.maxMs.toFixed(1),
    },
    "  of which ready -> first ok (slot + request)": {
      p50: report.watchSplit.readyToFirstOk.p50Ms.toFixed(1),
      max: report.watchSplit.readyToFirstOk.maxMs.toFixed(1),
    },
    "  (a warm 1-token request, for scale)": {
      p50: report.watchSplit.warmRequest.p50Ms.toFixed(1),
      max: report.watchSplit.warmRequest.maxMs.toFixed(1),
    },
    "rename -> first ok request (on demand)": {
      p50: report.request.p50Ms.toFixed(1),
      max: report.request.maxMs.toFixed(1),
    },
  });
  log(`wrote ${file}`);
}

await main();
