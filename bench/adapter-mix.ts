/**
 * @module bench/adapter-mix — throughput of mixed-task batches against base-only, side by side in one run
 * (`npm run bench -- --adapters`, or `npm run bench:adapters`): the same load with every sequence on the base,
 * on one LoRA, on N distinct LoRAs (N = 8, 32; rank 16 on q,k,v,o), on 8 distinct IA3 adapters and on 8
 * distinct soft prompts. Adapters are made (seeded) for the model under bench/.tasks/ and warmed up first,
 * so the figures compare serving, not loading. `--peft lora,ia3` serves them from a graph without the bottleneck
 * paths (the server's flag).
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { ia3Task, loraTask, promptTuningTask, publish } from "../scripts/make-examples.ts";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import { makeRng } from "../src/model/maker/prng.ts";
import { percentile, runLoad, steadyDecodeTokS } from "./load.ts";
import { benchPromptIds, ensureBenchModel } from "./models.ts";
import { startServer } from "./server-process.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));

interface Scenario {
  name: string;
  /** Task for client i (null = base). */
  task: (client: number) => string | null;
}

const SCENARIOS: Scenario[] = [
  { name: "base only", task: () => null },
  { name: "1 LoRA (r16 q,k,v,o)", task: () => "lora-0" },
  { name: "8 distinct LoRAs", task: (c) => `lora-${c % 8}` },
  { name: "32 distinct LoRAs", task: (c) => `lora-${c % 32}` },
  { name: "8 distinct IA3", task: (c) => `ia3-${c % 8}` },
  { name: "8 distinct soft prompts", task: (c) => `soft-${c % 8}` },
];

/** Make the task folders once per model (seeded, so every run serves the same weights). */
function ensureTasks(modelDir: string, key: string): string {
  const root = join(BENCH_DIR, ".tasks", key);
  if (existsSync(join(root, "soft-7", "adapter_config.json"))) return root;
  mkdirSync(root, { recursive: true });
  const { spec } = inspectCheckpoint(modelDir);
  const rng = makeRng(2026);
  for (let i = 0; i < 32; i++) publish(root, `lora-${i}`, loraTask(spec, rng, modelDir, 16));
  for (let i = 0; i < 8; i++) publish(root, `ia3-${i}`, ia3Task(spec, rng, modelDir));
  for (let i = 0; i < 8; i++) publish(root, `soft-${i}`, promptTuningTask(spec, rng, modelDir, 8));
  return root;
}

interface ScenarioSample {
  errors: number;
  throughputTokS: number;
  decodeTokS: number;
  itlMsP50: number;
  ttftMsP50: number;
}

export interface AdapterMixOptions {
  /** Passes over all scenarios (alternating order); medians are reported. */
  rounds: number;
  modelDir: string;
  modelKey: string;
  threads: number;
  concurrency: number;
  promptTokens: number;
  maxTokens: number;
  prompt: (client: number, i: number) => number[];
  log: (msg: string) => void;
  /** The server's --peft (default: its own, every kind). */
  peft?: string;
}

export async function runAdapterMix(options: AdapterMixOptions) {
  const tasks = ensureTasks(options.modelDir, options.modelKey);
  const server = await startServer([
    "--model",
    options.modelDir,
    "--threads",
    String(options.threads),
    "--adapters",
    tasks,
    "--prompt-tables",
    tasks,
    "--max-resident-adapters",
    "32",
    "--max-lora-rank",
    "16",
    "--max-num-seqs",
    String(Math.max(32, options.concurrency)),
    "--max-batched-tokens",
    String(Math.max(256, options.concurrency)),
    "--no-watch",
    ...(options.peft ? ["--peft", options.peft] : []),
  ]);
  const rows = [];
  try {
    // Warm up: every task once, so its weights are resident before anything is timed.
    const names = new Set(
      SCENARIOS.flatMap((s) => Array.from({ length: 32 }, (_, c) => s.task(c))).filter((t) => t !== null),
    );
    await runLoad({
      baseUrl: server.baseUrl,
      concurrency: names.size,
      requestsPerClient: 1,
      prompt: () => options.prompt(0, 0).slice(0, 8),
      maxTokens: 1,
      headers: (c) => ({ "X-Task": [...names][c]! }),
    });
    // Each scenario runs between two base-only runs (base, S1, base, S2, base, ...), and its ratio is taken
    // against the mean of those two neighbours: on this shared machine throughput drifts over minutes, so a base
    // figure from the far end of the round moved ratios by up to 0.14 from one round to the next. Rounds alternate
    // the scenario order (forward, then backward); each scenario reports its median over the rounds.
    const [baseScenario, ...others] = SCENARIOS as [Scenario, ...Scenario[]];
    const samples = new Map<string, ScenarioSample[]>();
    const pairedRatios = new Map<string, { decode: number; throughput: number }[]>();
    const measure = async (scenario: Scenario, round: number): Promise<ScenarioSample> => {
      options.log(
        `adapter mix round ${round + 1}/${options.rounds}: ${scenario.name} at concurrency ${options.concurrency}`,
      );
      const r = await runLoad({
        baseUrl: server.baseUrl,
        concurrency: options.concurrency,
        requestsPerClient: 1,
        prompt: options.prompt,
        maxTokens: options.maxTokens,
        headers: (c): Record<string, string> => {
          const task = scenario.task(c);
          return task ? { "X-Task": task } : {};
        },
      });
      const sample: ScenarioSample = {
        errors: r.errors,
        throughputTokS: r.completionTokens / r.wallS,
        // While all streams decode (bench/load.ts): the soft-prompt scenario's 8 extra prefill tokens a
        // request, and how they pack into prefill steps, stay out of this figure; they are in tok/s.
        decodeTokS: steadyDecodeTokS(r),
        itlMsP50: percentile(r.itlMs, 50),
        ttftMsP50: percentile(r.ttftMs, 50),
      };
      samples.set(scenario.name, [...(samples.get(scenario.name) ?? []), sample]);
      return sample;
    };
    for (let round = 0; round < options.rounds; round++) {
      const order = round % 2 === 0 ? others : [...others].reverse();
      let before = await measure(baseScenario, round);
      for (const scenario of order) {
        const sample = await measure(scenario, round);
        const after = await measure(baseScenario, round);
        const paired = (pick: (s: ScenarioSample) => number) =>
          (2 * pick(sample)) / (pick(before) + pick(after));
        pairedRatios.set(scenario.name, [
          ...(pairedRatios.get(scenario.name) ?? []),
          { decode: paired((s) => s.decodeTokS), throughput: paired((s) => s.throughputTokS) },
        ]);
        before = after;
      }
    }
    for (const scenario of SCENARIOS) {
      const list = samples.get(scenario.name)!;
      const median = (pick: (s: ScenarioSample) => number) => percentile(list.map(pick), 50);
      const ratios = (pairedRatios.get(scenario.name) ?? []).filter(
        (r) => Number.isFinite(r.decode) && Number.isFinite(r.throughput),
      );
      rows.push({
        scenario: scenario.name,
        errors: list.reduce((a, s) => a + s.errors, 0),
        throughputTokS: median((s) => s.throughputTokS),
        decodeTokS: median((s) => s.decodeTokS),
        itlMsP50: median((s) => s.itlMsP50),
        ttftMsP50: median((s) => s.ttftMsP50),
        // Kept per run so a reader can see how far one run's figure moves from the next.
        decodeTokSPerRun: list.map((s) => s.decodeTokS),
        // Against the base-only runs on either side; the base row is 1 by definition.
        throughputVsBase:
          scenario === baseScenario
            ? 1
            : percentile(
                ratios.map((r) => r.throughput),
                50,
              ),
        decodeVsBase:
          scenario === baseScenario
            ? 1
            : percentile(
                ratios.map((r) => r.decode),
                50,
              ),
        decodeVsBasePerRound: ratios.map((r) => r.decode),
      });
    }
  } finally {
    await server.stop();
  }
  return rows;
}

export function printAdapterMix(rows: Awaited<ReturnType<typeof runAdapterMix>>, concurrency: number): void {
  console.log(`\nmixed-task batches at concurrency ${concurrency} (ratios to base-only, same run)`);
  console.table(
    rows.map((r) => ({
      scenario: r.scenario,
      "tok/s": r.throughputTokS.toFixed(1),
      "x base": r.throughputVsBase.toFixed(3),
      "decode tok/s": r.decodeTokS.toFixed(1),
      "decode x base": r.decodeVsBase.toFixed(3),
      "per round":
        r.decodeVsBasePerRound.length > 0
          ? `${Math.min(...r.decodeVsBasePerRound).toFixed(2)}-${Math.max(...r.decodeVsBasePerRound).toFixed(2)}`
          : "-",
      "itl p50 ms": r.itlMsP50.toFixed(1),
      errors: r.errors,
    })),
  );
}

/** `npm run bench:adapters -- [--concurrency 32] [--threads N] [--max-tokens 128] [--prompt-tokens 128]` */
async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      concurrency: { type: "string", default: "32" },
      threads: { type: "string", default: String(availableParallelism()) },
      "max-tokens": { type: "string", default: "128" },
      "prompt-tokens": { type: "string", default: "128" },
      rounds: { type: "string", default: "2" },
      peft: { type: "string" },
    },
  });
  const log = (msg: string) => process.stderr.write(`[bench:adapters] ${msg}\n`);
  const modelDir = ensureBenchModel("smollm2-135m", log);
  const vocab = inspectCheckpoint(modelDir).spec.vocabSize;
  const promptTokens = Number(values["prompt-tokens"]);
  const concurrency = Number(values.concurrency);
  const rows = await runAdapterMix({
    rounds: Number(values.rounds),
    modelDir,
    modelKey: "smollm2-135m-seed0",
    threads: Number(values.threads),
    concurrency,
    promptTokens,
    maxTokens: Number(values["max-tokens"]),
    prompt: (c, i) => benchPromptIds(vocab, promptTokens, c, i),
    log,
    peft: values.peft,
  });
  printAdapterMix(rows, concurrency);
  const outDir = join(BENCH_DIR, "results");
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, `adapter-mix-${new Date().toISOString().replace(/[:.]/g, "-")}.json`);
  writeFileSync(
    file,
    `${JSON.stringify({ date: new Date().toISOString(), concurrency, peft: values.peft ?? "default", rows }, null, 2)}\n`,
  );
  log(`wrote ${file}`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) await main();
