/**
 * @module bench/compare-llamacpp — `npm run bench -- --compare-llamacpp`: taskmux (the real server, a child
 * process) against node-llama-cpp (llama.cpp's prebuilt CPU binary, a child process) on the same weights, the
 * same prompt ids and the same threads, measured interleaved in one run:
 *
 *   pairs    taskmux fp32 vs GGUF F32; taskmux int4 (MatMulNBits, blocks of 32 like Q4_0's) vs GGUF Q4_0 (every 2-D
 *            weight, head included); taskmux int4@128 (`--quant-block-size 128`: faster, less exact) vs the same Q4_0;
 *            taskmux fp32+spin (`--spin`: threads spin within a step) vs the same F32; fp32+nopeft (`--peft none`:
 *            no PEFT paths in the graph, the base model alone as llama.cpp runs it) and fp32+nopeft+spin vs F32
 *            (`--pairs a,b` runs a subset)
 *   metrics  prefill of a 128-token prompt (1 sequence); batch-1 decode; aggregate decode with 8 and 32 concurrent
 *            sequences; each also as a fraction of the roofline it is bound by (bench/machine.ts, measured before
 *            and after the run, the higher kept)
 *
 * node-llama-cpp is not a dependency of the project: the first run installs node-llama-cpp@3.22.1 and its
 * prebuilt `@node-llama-cpp/linux-x64` binary into bench/.llamacpp/ (`--omit=optional --ignore-scripts`: no
 * CUDA/Vulkan packages, no build from source), so `npm ci` stays as it is. The GGUF files are written by our own
 * writer (bench/gguf-writer.ts) next to the made model and reused while the checkpoint is unchanged.
 *
 * How each side is measured (the definitions of /work/shared/peer-bench, so its RESULTS.md numbers compare):
 *   node-llama-cpp  getLlama({gpu: false, build: "never"}), maxThreads = threads, context threads = threads,
 *                   defaults otherwise (flash attention auto, F16 KV cache). Prefill = evaluateWithoutGenerating-
 *                   NewTokens(128 ids) on a cleared sequence. Decode = ingest ids[0..126], then greedy
 *                   evaluate([ids[127]]) for `gen` tokens; N sequences run in lockstep (a barrier releases all N
 *                   next tokens in sequence order, so llama.cpp decodes them as one batch: its best case).
 *   taskmux         /v1/completions, prompt = the same ids, temperature 0, ignore_eos, stream (no logprobs: llama.cpp
 *                   computes none either). Prefill = time to the first token of a max_tokens=1 request. Decode =
 *                   tokens after the first / time between the first and the last token; with N streams, the tokens
 *                   all N streams produce while all N are decoding (from the last stream's first token to the first
 *                   stream's last token) / that window. A token whose text is empty (an incomplete UTF-8 sequence)
 *                   has no chunk of its own; the counts come from `usage`, the timestamps from the chunks.
 * Every repetition records the CPU that other processes used meanwhile; medians come from repetitions where
 * that stayed under --max-foreign cores when there are enough of them, else from all (the table says which).
 */
import { type ChildProcess, fork, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { QUANT_BLOCK_SIZE, type QuantBlockSize, quantizedBytes } from "../src/model/builder/quantize.ts";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import type { ModelSpec } from "../src/model/model-spec.ts";
import { TextTokenizer } from "../src/model/tokenizer.ts";
import { convertToGguf, type GgufWeights } from "./gguf-writer.ts";
import { aggregateDecode } from "./load.ts";
import { type MachineLimits, measureMachine, strongest } from "./machine.ts";
import { type ServerHandle, startServer } from "./server-process.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));
const THIS_FILE = fileURLToPath(import.meta.url);
export const LLAMACPP_DIR = join(BENCH_DIR, ".llamacpp");
export const NODE_LLAMA_CPP_VERSION = "3.22.1";
/** Bump when the GGUF conversion changes. */
const GGUF_WRITER_VERSION = 1;

function log(msg: string) {
  process.stderr.write(`[compare] ${msg}\n`);
}

// ------------------------------------------------------------------------------------------ install on demand

function installedVersion(pkg: string): string | null {
  try {
    const file = join(LLAMACPP_DIR, "node_modules", pkg, "package.json");
    return (JSON.parse(readFileSync(file, "utf8")) as { version: string }).version;
  } catch {
    return null;
  }
}

/** node-llama-cpp + its prebuilt linux-x64 CPU binary in bench/.llamacpp (ignored by git), installed once. */
export function ensureNodeLlamaCpp(): void {
  const v = NODE_LLAMA_CPP_VERSION;
  if (installedVersion("node-llama-cpp") === v && installedVersion("@node-llama-cpp/linux-x64") === v) return;
  if (process.platform !== "linux" || process.arch !== "x64") {
    throw new Error(
      `--compare-llamacpp uses node-llama-cpp's linux-x64 prebuilt binary (this is ${process.platform}-${process.arch})`,
    );
  }
  mkdirSync(LLAMACPP_DIR, { recursive: true });
  writeFileSync(join(LLAMACPP_DIR, ".gitignore"), "*\n");
  const pkg = join(LLAMACPP_DIR, "package.json");
  if (!existsSync(pkg))
    writeFileSync(pkg, `${JSON.stringify({ name: "taskmux-llamacpp-bench", private: true }, null, 2)}\n`);
  log(`installing node-llama-cpp@${v} (prebuilt CPU binary only) into ${LLAMACPP_DIR}`);
  const result = spawnSync(
    "npm",
    [
      "install",
      "--omit=optional",
      "--ignore-scripts",
      "--no-audit",
      "--no-fund",
      "--no-package-lock",
      `node-llama-cpp@${v}`,
      `@node-llama-cpp/linux-x64@${v}`,
    ],
    { cwd: LLAMACPP_DIR, stdio: "inherit", env: { ...process.env, NODE_LLAMA_CPP_SKIP_DOWNLOAD: "true" } },
  );
  if (result.status !== 0) throw new Error(`npm install of node-llama-cpp failed (exit ${result.status})`);
}

// ------------------------------------------------------------------------------------------ GGUF files

/** model-<weights>.gguf beside the made model, rewritten when the checkpoint or the writer changes. */
export function ensureGguf(modelDir: string, weights: GgufWeights): string {
  const info = inspectCheckpoint(modelDir);
  const dir = `${modelDir.replace(/\/+$/, "")}-gguf`;
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `model-${weights}.gguf`);
  const stamp = `${file}.stamp`;
  const key = `${GGUF_WRITER_VERSION}:${info.contentHash}`;
  if (existsSync(file) && existsSync(stamp) && readFileSync(stamp, "utf8") === key) return file;
  log(`writing ${file}`);
  convertToGguf(modelDir, file, weights);
  writeFileSync(stamp, key);
  return file;
}

// ------------------------------------------------------------------------------------------ CPU accounting

/** Busy CPU ticks of the machine and of this process plus `pids` (for "how much did others use meanwhile"). */
export function cpuTicks(pids: number[] = []) {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  const busy = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
  let own = 0;
  for (const pid of [process.pid, ...pids]) {
    try {
      const s = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
      own += Number(s[11]) + Number(s[12]);
    } catch {
      // exited
    }
  }
  return { busy, own, t: performance.now() };
}

type Ticks = ReturnType<typeof cpuTicks>;
/** Cores other processes kept busy between two readings. */
export const foreignCores = (a: Ticks, b: Ticks) =>
  Math.max(0, b.busy - a.busy - (b.own - a.own)) / 100 / ((b.t - a.t) / 1000);

// ------------------------------------------------------------------------------------------ shared metrics

/** Prompt ids below the special tokens (which the made tokenizers put last); stream i differs by a rotation. */
export function promptIds(vocab: number, length: number, stream = 0): number[] {
  const base = Array.from({ length }, (_, t) => 256 + ((t * 7919 + 104729) % (vocab - 512)));
  const r = (7 * stream) % length;
  return base.slice(r).concat(base.slice(0, r));
}

// ------------------------------------------------------------------------------------------ taskmux side

interface StreamResult {
  /** arrival time of each chunk that carried text */
  times: number[];
  completionTokens: number;
  startedAt: number;
}

async function completion(
  baseUrl: string,
  prompt: number[],
  maxTokens: number,
  extra: Record<string, unknown> = {},
): Promise<StreamResult> {
  const startedAt = performance.now();
  const res = await fetch(`${baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      prompt,
      max_tokens: maxTokens,
      temperature: 0,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
      ...extra,
    }),
  });
  if (!res.ok || !res.body) throw new Error(`taskmux ${res.status}: ${await res.text()}`);
  const out: StreamResult = { times: [], completionTokens: 0, startedAt };
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of res.body) {
    const now = performance.now();
    buffer += decoder.decode(chunk as Uint8Array, { stream: true });
    let nl = buffer.indexOf("\n\n");
    while (nl >= 0) {
      const event = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 2);
      nl = buffer.indexOf("\n\n");
      const line = event.split("\n").find((l) => l.startsWith("data: "));
      if (!line || line === "data: [DONE]") continue;
      const data = JSON.parse(line.slice(6)) as {
        choices?: { text?: string }[];
        usage?: { completion_tokens: number } | null;
        error?: { message: string };
      };
      if (data.error) throw new Error(`taskmux stream error: ${data.error.message}`);
      if (data.choices?.some((c) => c.text)) out.times.push(now);
      if (data.usage) out.completionTokens = data.usage.completion_tokens;
    }
  }
  return out;
}

/** Greedy tokens (as text, the API's legacy logprobs form) and their logprobs. */
async function greedyTokens(baseUrl: string, prompt: number[], n: number) {
  const res = await fetch(`${baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: n, temperature: 0, ignore_eos: true, logprobs: 0 }),
  });
  const body = (await res.json()) as {
    choices: { logprobs?: { tokens: string[]; token_logprobs: number[] } }[];
  };
  const lp = body.choices[0]?.logprobs;
  return { tokens: lp?.tokens ?? [], logprobs: lp?.token_logprobs ?? [] };
}

class TaskmuxSide {
  private constructor(
    readonly server: ServerHandle,
    readonly vocab: number,
  ) {}

  static async start(modelDir: string, threads: number, vocab: number, pair: Pair): Promise<TaskmuxSide> {
    const server = await startServer([
      ...("quantBlockSize" in pair ? ["--quant-block-size", String(pair.quantBlockSize)] : []),
      ...("spin" in pair && pair.spin ? ["--spin"] : []),
      ...("peftNone" in pair && pair.peftNone ? ["--peft", "none"] : []),
      "--model",
      modelDir,
      "--threads",
      String(threads),
      "--weights",
      pair.weights,
      "--max-num-seqs",
      "32",
      "--max-batched-tokens",
      "256",
    ]);
    return new TaskmuxSide(server, vocab);
  }

  get pid(): number {
    return this.server.child.pid ?? 0;
  }

  async prefill(promptTokens: number): Promise<number> {
    const r = await completion(this.server.baseUrl, promptIds(this.vocab, promptTokens), 1);
    if (r.times.length === 0) throw new Error("taskmux: the prefill request streamed no text");
    return promptTokens / ((r.times[0]! - r.startedAt) / 1000);
  }

  async decode(streams: number, promptTokens: number, gen: number) {
    const results = await Promise.all(
      Array.from({ length: streams }, (_, i) =>
        completion(this.server.baseUrl, promptIds(this.vocab, promptTokens, i), gen),
      ),
    );
    return aggregateDecode(
      results.map((r) => r.times),
      results.map((r) => r.completionTokens || r.times.length),
    );
  }

  async greedy(promptTokens: number, n: number) {
    return greedyTokens(this.server.baseUrl, promptIds(this.vocab, promptTokens), n);
  }

  stop() {
    return this.server.stop();
  }
}

// ------------------------------------------------------------------------------------------ node-llama-cpp side

type WorkerRequest =
  | { cmd: "prefill"; ids: number[] }
  | { cmd: "decode"; prompts: number[][]; gen: number }
  | { cmd: "greedy"; ids: number[]; n: number }
  | { cmd: "info" };

class LlamaCppSide {
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  private constructor(
    private readonly child: ChildProcess,
    readonly vocab: number,
  ) {
    child.on("message", (m: { id: number; ok: boolean; result?: unknown; error?: string }) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.ok) p.resolve(m.result);
      else p.reject(new Error(m.error));
    });
    child.on("exit", (code) => {
      for (const p of this.pending.values()) p.reject(new Error(`node-llama-cpp worker exited (${code})`));
      this.pending.clear();
    });
  }

  static async start(gguf: string, threads: number, vocab: number): Promise<LlamaCppSide> {
    const child = fork(THIS_FILE, ["--nlc-worker", "--model", gguf, "--threads", String(threads)], {
      execArgv: ["--import", "tsx"],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    const side = new LlamaCppSide(child, vocab);
    await side.call({ cmd: "info" });
    return side;
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  call<T>(request: WorkerRequest): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ id, ...request });
    });
  }

  async prefill(promptTokens: number): Promise<number> {
    const ms = await this.call<number>({ cmd: "prefill", ids: promptIds(this.vocab, promptTokens) });
    return promptTokens / (ms / 1000);
  }

  async decode(streams: number, promptTokens: number, gen: number) {
    const prompts = Array.from({ length: streams }, (_, i) => promptIds(this.vocab, promptTokens, i));
    const times = await this.call<number[][]>({ cmd: "decode", prompts, gen });
    return aggregateDecode(times);
  }

  greedy(promptTokens: number, n: number) {
    return this.call<{ ids: number[]; logprobs: number[] }>({
      cmd: "greedy",
      ids: promptIds(this.vocab, promptTokens),
      n,
    });
  }

  stop(): Promise<void> {
    return new Promise((resolve) => {
      if (this.child.exitCode !== null) return resolve();
      this.child.once("exit", () => resolve());
      this.child.kill("SIGTERM");
    });
  }
}

/** The child process: one model, contexts made on demand per sequence count and kept. */
async function nlcWorkerMain(): Promise<void> {
  const arg = (name: string) => process.argv[process.argv.indexOf(`--${name}`) + 1]!;
  const modelPath = arg("model");
  const threads = Number(arg("threads"));
  const require = createRequire(join(LLAMACPP_DIR, "noop.js"));
  // biome-ignore lint/suspicious/noExplicitAny: node-llama-cpp is installed on demand, without typings here
  const nlc: any = await import(require.resolve("node-llama-cpp"));
  const llama = await nlc.getLlama({
    gpu: false,
    build: "never",
    usePrebuiltBinaries: true,
    skipDownload: true,
    maxThreads: threads,
    progressLogs: false,
    logLevel: nlc.LlamaLogLevel.error,
  });
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
  // biome-ignore lint/suspicious/noExplicitAny: see above
  const contexts = new Map<string, { ctx: any; seqs: any[] }>();
  const contextFor = async (n: number, exact = false) => {
    const key = `${n}:${exact}`;
    let c = contexts.get(key);
    if (!c) {
      const options: Record<string, unknown> = {
        contextSize: 512,
        sequences: n,
        threads: { ideal: threads, min: threads },
        flashAttention: exact ? false : "auto",
      };
      if (exact)
        Object.assign(options, { experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32" });
      const ctx = await model.createContext(options);
      c = { ctx, seqs: Array.from({ length: n }, () => ctx.getSequence()) };
      contexts.set(key, c);
    }
    return c;
  };
  const handle = async (req: WorkerRequest & { id: number }): Promise<unknown> => {
    switch (req.cmd) {
      case "info":
        return { buildType: llama.buildType };
      case "prefill": {
        const { seqs } = await contextFor(1);
        await seqs[0].clearHistory();
        const t0 = performance.now();
        await seqs[0].evaluateWithoutGeneratingNewTokens(req.ids);
        return performance.now() - t0;
      }
      case "decode": {
        const n = req.prompts.length;
        const { seqs } = await contextFor(n);
        for (const s of seqs) await s.clearHistory();
        await Promise.all(
          seqs.map((s, i) => s.evaluateWithoutGeneratingNewTokens(req.prompts[i]!.slice(0, -1))),
        );
        // Lockstep: after each token every generator waits; the barrier releases them in sequence order.
        const waiting: [number, () => void][] = [];
        const barrier = (i: number) =>
          new Promise<void>((resolve) => {
            waiting.push([i, resolve]);
            if (waiting.length === n) {
              const all = waiting.splice(0).sort((a, b) => a[0] - b[0]);
              for (const [, r] of all) r();
            }
          });
        return Promise.all(
          seqs.map(async (s, i) => {
            const times: number[] = [performance.now()];
            const prompt = req.prompts[i]!;
            for await (const _ of s.evaluate([prompt[prompt.length - 1]], {
              temperature: 0,
              yieldEogToken: true,
            })) {
              times.push(performance.now());
              if (times.length > req.gen) break;
              if (n > 1) await barrier(i);
            }
            return times;
          }),
        );
      }
      case "greedy": {
        const { seqs } = await contextFor(1, true);
        await seqs[0].clearHistory();
        const ids: number[] = [];
        const logprobs: number[] = [];
        for await (const r of seqs[0].evaluateWithMetadata(
          req.ids,
          { probabilities: true },
          { temperature: 0, yieldEogToken: true },
        )) {
          ids.push(r.token);
          logprobs.push(Math.log(r.probabilities.get(r.token) ?? 0));
          if (ids.length >= req.n) break;
        }
        return { ids, logprobs };
      }
    }
  };
  process.on("message", (req: WorkerRequest & { id: number }) => {
    handle(req).then(
      (result) => process.send!({ id: req.id, ok: true, result }),
      (error: Error) => process.send!({ id: req.id, ok: false, error: error.stack ?? String(error) }),
    );
  });
  process.on("SIGTERM", async () => {
    for (const c of contexts.values()) await c.ctx.dispose();
    await model.dispose();
    await llama.dispose();
    process.exit(0);
  });
}

if (process.argv[1] === THIS_FILE && process.argv.includes("--nlc-worker")) await nlcWorkerMain();

// ------------------------------------------------------------------------------------------ the comparison

export interface CompareOptions {
  modelDir: string;
  threads: number;
  machine: MachineLimits;
  reps: number;
  promptTokens: number;
  gen: number;
  concurrencies: number[];
  /** The taskmux sides to run, by label (default: every pair of PAIRS). */
  pairs?: string[];
  /** Repetitions during which other processes used more cores than this are flagged as contended. */
  maxForeign: number;
  outDir: string;
}

/**
 * `ours` labels the taskmux side: its --weights, @B for a non-default --quant-block-size B, +spin for --spin,
 * +nopeft for `--peft none` (no PEFT paths in the graph: what llama.cpp runs, a base model alone).
 */
const PAIRS = [
  { ours: "fp32", weights: "fp32", gguf: "F32" },
  { ours: "fp32+spin", weights: "fp32", spin: true, gguf: "F32" },
  { ours: "fp32+nopeft", weights: "fp32", peftNone: true, gguf: "F32" },
  { ours: "fp32+nopeft+spin", weights: "fp32", peftNone: true, spin: true, gguf: "F32" },
  { ours: "int4", weights: "int4", gguf: "Q4_0" },
  { ours: "int4@128", weights: "int4", quantBlockSize: 128, gguf: "Q4_0" },
] as const satisfies readonly {
  ours: string;
  weights: string;
  quantBlockSize?: QuantBlockSize;
  spin?: boolean;
  peftNone?: boolean;
  gguf: GgufWeights;
}[];

type Pair = (typeof PAIRS)[number];

type Metric = "prefill" | `decode${number}`;

interface Sample {
  tokS: number;
  foreign: number;
  windowMs?: number;
}

/** Weight bytes one forward pass streams (every matmul weight once; the embedding Gather reads only rows). */
function bytesPerStep(spec: ModelSpec, label: string): number {
  const [format, block] = label.split("+")[0]!.split("@");
  const blockSize = block ? Number(block) : QUANT_BLOCK_SIZE;
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  const mats: [number, number][] = [
    [q + 2 * kv, d],
    [d, q],
    [2 * ff, d],
    [d, ff],
  ];
  let bytes = 0;
  for (const [n, k] of mats) {
    const per =
      format === "fp32" || format === "F32"
        ? n * k * 4
        : format === "Q4_0"
          ? (n * k * 18) / 32
          : quantizedBytes(n, k, 4, blockSize);
    bytes += per * spec.numLayers;
  }
  const [n, k] = [spec.vocabSize, d];
  bytes +=
    format === "fp32" || format === "F32"
      ? n * k * 4
      : format === "Q4_0"
        ? (n * k * 18) / 32
        : quantizedBytes(n, k, 4, blockSize);
  return bytes;
}

function matmulParams(spec: ModelSpec): number {
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  return spec.numLayers * (d * (q + 2 * kv) + q * d + 3 * d * spec.intermediateSize) + spec.vocabSize * d;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0
    ? Number.NaN
    : s.length % 2
      ? s[(s.length - 1) / 2]!
      : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export async function compareWithLlamaCpp(options: CompareOptions) {
  const { modelDir, threads, reps, promptTokens, gen, concurrencies } = options;
  ensureNodeLlamaCpp();
  const info = inspectCheckpoint(modelDir);
  const spec = info.spec;
  const params = matmulParams(spec);
  const metrics: Metric[] = ["prefill", "decode1", ...concurrencies.map((c) => `decode${c}` as Metric)];
  const pairs: readonly Pair[] = options.pairs ? PAIRS.filter((p) => options.pairs!.includes(p.ours)) : PAIRS;
  const unknown = options.pairs?.filter((label) => !PAIRS.some((p) => p.ours === label)) ?? [];
  if (unknown.length > 0 || pairs.length === 0)
    throw new Error(
      `--pairs takes labels among ${PAIRS.map((p) => p.ours).join(", ")}; got ${unknown.join(", ")}`,
    );
  const samples = new Map<string, Sample[]>();
  const sample = (key: string) => {
    let list = samples.get(key);
    if (!list) {
      list = [];
      samples.set(key, list);
    }
    return list;
  };
  const numerics: Record<string, unknown> = {};
  // One side per distinct label: two pairs against the same GGUF share its llama.cpp side.
  const sides: { label: string; side: TaskmuxSide | LlamaCppSide }[] = [];
  const sideOf = (label: string) => sides.find((s) => s.label === label)!.side;
  try {
    for (const pair of pairs) {
      const gguf = ensureGguf(modelDir, pair.gguf);
      log(`starting taskmux ${pair.ours}`);
      sides.push({
        label: `taskmux ${pair.ours}`,
        side: await TaskmuxSide.start(modelDir, threads, spec.vocabSize, pair),
      });
      if (sides.some((s) => s.label === `llama.cpp ${pair.gguf}`)) continue;
      log(`starting node-llama-cpp ${pair.gguf}`);
      sides.push({
        label: `llama.cpp ${pair.gguf}`,
        side: await LlamaCppSide.start(gguf, threads, spec.vocabSize),
      });
    }
    const pids = () => sides.map((s) => s.side.pid);
    const tokenizer = TextTokenizer.load(modelDir);
    const utf8 = new TextDecoder();
    const textOf = (id: number) => {
      const bytes = tokenizer.tokenBytes(id);
      return bytes ? utf8.decode(bytes) : tokenizer.tokenString(id);
    };
    // Numerics: the same greedy steps on both sides of each pair (llama.cpp with an F32 cache, no flash attention).
    for (const pair of pairs) {
      const ours = await (sideOf(`taskmux ${pair.ours}`) as TaskmuxSide).greedy(promptTokens, 16);
      const theirs = await (sideOf(`llama.cpp ${pair.gguf}`) as LlamaCppSide).greedy(promptTokens, 16);
      const diffs = theirs.logprobs.map((lp, i) => Math.abs(lp - (ours.logprobs[i] ?? Number.NaN)));
      numerics[`${pair.ours} vs ${pair.gguf}`] = {
        steps: 16,
        tokensMatch: theirs.ids.every((id, i) => textOf(id) === ours.tokens[i]),
        maxAbsLogprobDiff: Math.max(...diffs),
        meanAbsLogprobDiff: diffs.reduce((x, y) => x + y, 0) / diffs.length,
      };
      log(
        `numerics ${pair.ours} vs ${pair.gguf}: ${JSON.stringify(numerics[`${pair.ours} vs ${pair.gguf}`])}`,
      );
    }
    // Warm-up: one of everything, untimed.
    for (const s of sides) {
      await s.side.prefill(promptTokens);
      await s.side.decode(1, promptTokens, 16);
    }
    for (let rep = 0; rep < reps; rep++) {
      for (const metric of metrics) {
        // Alternate which system goes first, rep by rep.
        const order = rep % 2 ? [...sides].reverse() : sides;
        for (const s of order) {
          const before = cpuTicks(pids());
          let tokS: number;
          let windowMs: number | undefined;
          if (metric === "prefill") tokS = await s.side.prefill(promptTokens);
          else {
            const n = Number(metric.slice(6));
            const r = await s.side.decode(n, promptTokens, gen);
            tokS = r.tokS;
            windowMs = r.windowMs;
          }
          const foreign = foreignCores(before, cpuTicks(pids()));
          sample(`${s.label}|${metric}`).push({ tokS, foreign, windowMs });
          log(
            `rep ${rep + 1}/${reps} ${metric} ${s.label}: ${tokS.toFixed(1)} tok/s (others used ${foreign.toFixed(2)} cores)`,
          );
        }
      }
    }
  } finally {
    for (const s of sides) await s.side.stop();
  }
  log("measuring machine limits again");
  const after = await measureMachine(threads);
  const machine = strongest(options.machine, after);

  const rows = [];
  for (const pair of pairs) {
    for (const metric of metrics) {
      const stat = (label: string) => {
        const all = samples.get(`${label}|${metric}`) ?? [];
        const clean = all.filter((x) => x.foreign <= options.maxForeign);
        const used = clean.length >= Math.ceil(reps / 2) ? clean : all;
        return {
          median: median(used.map((x) => x.tokS)),
          best: Math.max(...all.map((x) => x.tokS)),
          all: all.map((x) => x.tokS),
          foreignCores: all.map((x) => x.foreign),
          cleanReps: clean.length,
        };
      };
      const ours = stat(`taskmux ${pair.ours}`);
      const theirs = stat(`llama.cpp ${pair.gguf}`);
      const n = metric === "prefill" ? 1 : Number(metric.slice(6));
      const roof = (format: string) =>
        metric === "prefill"
          ? machine.gemmFlopsPerS / (2 * params)
          : Math.min(
              (n * machine.bandwidthBytesPerS) / bytesPerStep(spec, format),
              machine.gemmFlopsPerS / (2 * params),
            );
      const boundBy =
        metric === "prefill" ||
        (n * machine.bandwidthBytesPerS) / bytesPerStep(spec, pair.ours) >
          machine.gemmFlopsPerS / (2 * params)
          ? "compute"
          : "bandwidth";
      rows.push({
        pair: `${pair.ours} vs ${pair.gguf}`,
        metric,
        boundBy,
        taskmux: ours,
        llamacpp: theirs,
        ratio: ours.median / theirs.median,
        taskmuxRooflineTokS: roof(pair.ours),
        llamacppRooflineTokS: roof(pair.gguf),
        taskmuxFractionOfRoofline: ours.median / roof(pair.ours),
        llamacppFractionOfRoofline: theirs.median / roof(pair.gguf),
      });
    }
  }
  const report = {
    date: new Date().toISOString(),
    modelDir,
    matmulParameters: params,
    threads,
    reps,
    promptTokens,
    genTokens: gen,
    nodeLlamaCpp: NODE_LLAMA_CPP_VERSION,
    machine: {
      bandwidthGBs: machine.bandwidthBytesPerS / 1e9,
      gemmGflops: machine.gemmFlopsPerS / 1e9,
      measured: [options.machine, after].map((m) => ({
        bandwidthGBs: m.bandwidthBytesPerS / 1e9,
        gemmGflops: m.gemmFlopsPerS / 1e9,
      })),
    },
    bytesPerStep: Object.fromEntries(
      [...new Set(pairs.flatMap((p) => [p.ours, p.gguf]))].map((f) => [f, bytesPerStep(spec, f)]),
    ),
    ggufBytes: Object.fromEntries(pairs.map((p) => [p.gguf, statSync(ensureGguf(modelDir, p.gguf)).size])),
    maxForeignCores: options.maxForeign,
    numerics,
    rows,
  };
  mkdirSync(options.outDir, { recursive: true });
  const file = join(options.outDir, `compare-llamacpp-${report.date.replace(/[:.]/g, "-")}.json`);
  writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  printComparison(report);
  log(`wrote ${file}`);
  return report;
}

function printComparison(report: {
  machine: { bandwidthGBs: number; gemmGflops: number };
  threads: number;
  reps: number;
  rows: {
    pair: string;
    metric: string;
    boundBy: string;
    ratio: number;
    taskmux: { median: number; cleanReps: number };
    llamacpp: { median: number; cleanReps: number };
    taskmuxFractionOfRoofline: number;
    llamacppFractionOfRoofline: number;
    taskmuxRooflineTokS: number;
  }[];
}) {
  console.log(
    `\ntaskmux vs node-llama-cpp ${NODE_LLAMA_CPP_VERSION}, ${report.threads} threads, ${report.reps} interleaved repetitions; machine ${report.machine.bandwidthGBs.toFixed(1)} GB/s, ${report.machine.gemmGflops.toFixed(0)} GFLOP/s`,
  );
  console.table(
    report.rows.map((r) => ({
      pair: r.pair,
      metric: r.metric === "prefill" ? "prefill 128 (tok/s)" : `decode x${r.metric.slice(6)} (tok/s)`,
      taskmux: r.taskmux.median.toFixed(1),
      "llama.cpp": r.llamacpp.median.toFixed(1),
      ratio: `${r.ratio.toFixed(2)}x`,
      bound: r.boundBy,
      roofline: r.taskmuxRooflineTokS.toFixed(0),
      "taskmux % roof": `${(100 * r.taskmuxFractionOfRoofline).toFixed(0)}%`,
      "llama.cpp % roof": `${(100 * r.llamacppFractionOfRoofline).toFixed(0)}%`,
      "clean reps (ours, theirs)": `${r.taskmux.cleanReps}, ${r.llamacpp.cleanReps} of ${report.reps}`,
    })),
  );
}
