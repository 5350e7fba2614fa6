/**
 * @module bench/soak — `npm run soak`: a long mixed-task load against the server as a child process, to catch
 * leaks and slow failures. Clients loop until the deadline over the base model and every example task
 * (prompt-tables/, adapters/), streaming and not, completions and chat, with mid-stream disconnects and early
 * cancellations. Reports errors by status, the child's RSS every 10 s, latency percentiles, and at the end
 * checks through /metrics that nothing leaked (no running or waiting sequence, KV use 0) and that RSS at the
 * end is within 5% of RSS after the first minute. Prints a verdict (exit 1 on FAIL), writes
 * bench/results/soak-<time>.json.
 *
 *   npm run soak -- [--duration-s 600] [--clients 16] [--model default|tiny|<preset>|DIR] [--threads N]
 */
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { request } from "undici";
import { makeModel, PRESETS, type PresetName } from "../src/model/maker/make-model.ts";
import { makeRng, type Rng } from "../src/model/maker/prng.ts";
import { percentile } from "./load.ts";
import { type ServerHandle, startServer } from "./server-process.ts";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const RSS_SAMPLE_MS = 10_000;
/** RSS is compared over one-minute windows (the minute after the first, the last minute), by median: a single
 * 10 s sample lands on the garbage collector's peaks and troughs, while a leak moves the whole window. */
const RSS_WINDOW_S = 60;
const RSS_TOLERANCE = 0.05;

const { values } = parseArgs({
  options: {
    "duration-s": { type: "string", default: "600" },
    clients: { type: "string", default: "16" },
    model: { type: "string", default: "default" },
    threads: { type: "string" },
    seed: { type: "string", default: "1" },
  },
});
const durationS = Number(values["duration-s"]);
const numClients = Number(values.clients);

function say(msg: string) {
  process.stderr.write(`[soak] ${msg}\n`);
}

/** A preset name → its made directory (the embedded default lives in models/default); else a directory. */
function modelDir(model: string): string {
  if (!(model in PRESETS)) return model;
  const dir =
    model === "default" ? join(REPO, "models", "default") : join(REPO, "bench", ".models", `${model}-seed0`);
  if (!existsSync(join(dir, "config.json"))) {
    say(`making the ${model} model in ${dir}`);
    makeModel({ preset: model as PresetName, seed: 0, out: dir });
  }
  return dir;
}

const PROMPTS = [
  "Once upon a time",
  "The library will close early on Friday because of the staff training day.",
  "Hi! My order arrived broken and I would like a replacement.",
  "Write a short poem about the sea.",
  "Rain is expected all weekend, so the market moves indoors to the town hall.",
  "Explain continuous batching in one sentence.",
];

type Outcome = "ok" | "disconnected" | "cancelled" | `status ${number}` | "error frame" | "network error";

interface SoakStats {
  outcomes: Map<Outcome, number>;
  latencyMs: number[];
  ttftMs: number[];
  byTask: Map<string, number>;
  numRequests: number;
  errorSamples: string[];
}

function pick<T>(rng: Rng, items: readonly T[]): T {
  return items[rng.int(items.length)]!;
}

/** One request with a randomly chosen shape; never throws. */
async function oneRequest(baseUrl: string, tasks: string[], rng: Rng, stats: SoakStats): Promise<void> {
  const task = pick(rng, tasks);
  const isChat = rng.uniform() < 0.4;
  const isStream = rng.uniform() < 0.5;
  const roll = rng.uniform();
  const action = roll < 0.1 && isStream ? "disconnect" : roll < 0.2 ? "cancel" : "normal";
  const prompt = pick(rng, PROMPTS);
  const body: Record<string, unknown> = {
    max_tokens: 4 + rng.int(60),
    temperature: rng.uniform() < 0.5 ? 0 : 0.8,
    stream: isStream,
    ...(rng.uniform() < 0.1 ? { n: 2 } : {}),
    ...(isChat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
  };
  // Half the tasked requests name the task in `model`, the other half in X-Task.
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (task !== "base" && rng.uniform() < 0.5) headers["x-task"] = task;
  else if (task !== "base") body.model = task;
  const controller = new AbortController();
  const cancelAfterMs = 5 + rng.int(300);
  const timer = action === "cancel" ? setTimeout(() => controller.abort(), cancelAfterMs) : undefined;
  const disconnectAfterChunks = 1 + rng.int(8);
  const started = performance.now();
  const count = (o: Outcome): void => {
    stats.outcomes.set(o, (stats.outcomes.get(o) ?? 0) + 1);
  };
  stats.numRequests++;
  stats.byTask.set(task, (stats.byTask.get(task) ?? 0) + 1);
  try {
    const path = isChat ? "/v1/chat/completions" : "/v1/completions";
    const res = await request(`${baseUrl}${path}`, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: controller.signal,
      headersTimeout: 120_000,
      bodyTimeout: 120_000,
    });
    if (res.statusCode !== 200) {
      const text = await res.body.text();
      if (stats.errorSamples.length < 20) stats.errorSamples.push(`${res.statusCode} ${text.slice(0, 300)}`);
      return count(`status ${res.statusCode}`);
    }
    if (!isStream) {
      await res.body.json();
    } else {
      let chunks = 0;
      let text = "";
      for await (const data of res.body) {
        text += data.toString();
        if (chunks === 0) stats.ttftMs.push(performance.now() - started);
        chunks++;
        if (action === "disconnect" && chunks >= disconnectAfterChunks) {
          controller.abort();
          break;
        }
      }
      if (controller.signal.aborted) return count(action === "disconnect" ? "disconnected" : "cancelled");
      if (text.includes('data: {"error"')) {
        if (stats.errorSamples.length < 20) stats.errorSamples.push(text.slice(-300));
        return count("error frame");
      }
    }
    stats.latencyMs.push(performance.now() - started);
    count("ok");
  } catch (error) {
    if (controller.signal.aborted) return count(action === "disconnect" ? "disconnected" : "cancelled");
    if (stats.errorSamples.length < 20) stats.errorSamples.push(String(error));
    count("network error");
  } finally {
    clearTimeout(timer);
  }
}

/** Median RSS of the samples. */
function rssMedian(samples: { rssMb: number }[]): number {
  if (samples.length === 0) return Number.NaN;
  const sorted = samples.map((s) => s.rssMb).sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function metrics(baseUrl: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  const wanted = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc"];
  const out: Record<string, number> = {};
  for (const name of wanted) {
    const line = text.split("\n").find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
    out[name] = Number(line?.split(" ").at(-1) ?? Number.NaN);
  }
  return out;
}

/** Waits (up to `ms`) for every sequence to leave: cancelled ones finish at the next step boundary. */
async function settledMetrics(baseUrl: string, ms: number): Promise<Record<string, number>> {
  const until = Date.now() + ms;
  for (;;) {
    const m = await metrics(baseUrl);
    if (Object.values(m).every((v) => v === 0) || Date.now() > until) return m;
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function taskNames(baseUrl: string): Promise<string[]> {
  const list = (await (await fetch(`${baseUrl}/v1/models`)).json()) as {
    data: { id: string; parent: string | null }[];
  };
  return list.data.filter((m) => m.parent !== null).map((m) => m.id);
}

async function main() {
  const dir = modelDir(values.model);
  const args = [
    "--model",
    dir,
    "--prompt-tables",
    join(REPO, "prompt-tables"),
    "--adapters",
    join(REPO, "adapters"),
    ...(values.threads ? ["--threads", values.threads] : []),
  ];
  say(`starting the server: ${args.join(" ")}`);
  const server: ServerHandle = await startServer(args, { readyTimeoutMs: 600_000 });
  const logCounts = { warn: 0, error: 0 };
  server.child.stderr?.on("data", (d: Buffer) => {
    for (const level of ["warn", "error"] as const)
      logCounts[level] += d.toString().split(`"level":"${level}"`).length - 1;
  });
  const tasks = ["base", ...(await taskNames(server.baseUrl))];
  say(`${numClients} clients for ${durationS} s over ${tasks.join(", ")}`);
  const stats: SoakStats = {
    outcomes: new Map(),
    latencyMs: [],
    ttftMs: [],
    byTask: new Map(),
    numRequests: 0,
    errorSamples: [],
  };
  const started = Date.now();
  const rss: { tS: number; rssMb: number }[] = [];
  const sampleRss = () => {
    const tS = Math.round((Date.now() - started) / 1000);
    const rssMb = server.rssBytes() / 2 ** 20;
    rss.push({ tS, rssMb: Number(rssMb.toFixed(1)) });
    const ok = stats.outcomes.get("ok") ?? 0;
    say(`t=${tS}s rss=${rssMb.toFixed(1)} MiB requests=${stats.numRequests} ok=${ok}`);
  };
  sampleRss();
  const sampler = setInterval(sampleRss, RSS_SAMPLE_MS);
  const deadline = started + durationS * 1000;
  try {
    await Promise.all(
      Array.from({ length: numClients }, async (_, client) => {
        const rng = makeRng(Number(values.seed) * 1000 + client);
        while (Date.now() < deadline) await oneRequest(server.baseUrl, tasks, rng, stats);
      }),
    );
  } finally {
    clearInterval(sampler);
  }
  const end = await settledMetrics(server.baseUrl, 10_000);
  sampleRss();
  await server.stop();
  report(stats, rss, end, logCounts, dir, tasks);
}

function report(
  stats: SoakStats,
  rss: { tS: number; rssMb: number }[],
  end: Record<string, number>,
  logCounts: { warn: number; error: number },
  model: string,
  tasks: string[],
) {
  const last = rss.at(-1)!;
  const early = rss.filter((s) => s.tS >= RSS_WINDOW_S && s.tS <= 2 * RSS_WINDOW_S);
  const firstMinute = rssMedian(early.length > 0 ? early : rss.slice(1)); // runs under two minutes: all but t=0
  const lastMinute = rssMedian(rss.filter((s) => s.tS >= last.tS - RSS_WINDOW_S));
  const rssGrowth = (lastMinute - firstMinute) / firstMinute;
  const outcomes = Object.fromEntries([...stats.outcomes].sort());
  const numErrors = [...stats.outcomes]
    .filter(([o]) => !["ok", "disconnected", "cancelled"].includes(o))
    .reduce((a, [, n]) => a + n, 0);
  const leaks = Object.entries(end).filter(([, v]) => v !== 0);
  const checks = {
    noErrors: numErrors === 0,
    noLeakedSlots: leaks.length === 0,
    rssWithin5Percent: Math.abs(rssGrowth) <= RSS_TOLERANCE,
  };
  const verdict = Object.values(checks).every(Boolean) ? "PASS" : "FAIL";
  const latency = (values: number[]) => ({
    p50: Math.round(percentile(values, 50)),
    p90: Math.round(percentile(values, 90)),
    p99: Math.round(percentile(values, 99)),
    max: Math.round(Math.max(...values)),
  });
  const result = {
    kind: "soak",
    date: new Date().toISOString(),
    model,
    durationS,
    clients: numClients,
    tasks,
    requests: stats.numRequests,
    byTask: Object.fromEntries(stats.byTask),
    outcomes,
    errors: numErrors,
    errorSamples: stats.errorSamples,
    serverLogLines: logCounts,
    latencyMs: latency(stats.latencyMs),
    ttftMs: latency(stats.ttftMs),
    rss: {
      afterFirstMinuteMb: firstMinute,
      endMb: lastMinute,
      growth: rssGrowth,
      lastSampleMb: last.rssMb,
      maxMb: Math.max(...rss.map((s) => s.rssMb)),
      samples: rss,
    },
    endMetrics: end,
    checks,
    verdict,
  };
  const outDir = join(REPO, "bench", "results");
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, `soak-${result.date.replace(/[:.]/g, "-")}.json`);
  writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`);
  console.log(`requests        ${stats.numRequests} (${JSON.stringify(outcomes)})`);
  console.log(
    `errors          ${numErrors}; server log lines: ${logCounts.warn} warn, ${logCounts.error} error`,
  );
  console.log(`latency ms      ${JSON.stringify(result.latencyMs)} (completed requests)`);
  console.log(`ttft ms         ${JSON.stringify(result.ttftMs)} (streams)`);
  console.log(
    `rss MiB         ${firstMinute} (median, ${RSS_WINDOW_S}-${2 * RSS_WINDOW_S} s) -> ${lastMinute} (median, last minute): ${(rssGrowth * 100).toFixed(2)}%; last sample ${last.rssMb}, max ${result.rss.maxMb}`,
  );
  console.log(`end metrics     ${JSON.stringify(end)}`);
  console.log(`verdict         ${verdict} ${JSON.stringify(checks)}`);
  console.log(`wrote           ${file}`);
  process.exitCode = verdict === "PASS" ? 0 : 1;
}

await main();
