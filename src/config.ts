/** @module config — one zod schema for command-line flags and environment; parsed once into a frozen Config. */
import { availableParallelism, homedir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { z } from "zod";

const REPO_ROOT = resolve(import.meta.dirname, "..");

const positiveInt = z.coerce.number().int().positive();

/** What --peft may name (model/contract.ts AdapterPoolKind). */
const PEFT_KINDS = ["lora", "ia3", "bottleneck"] as const;

export const configSchema = z
  .object({
    model: z
      .string()
      .min(1)
      .default(join(REPO_ROOT, "models", "default")),
    host: z.string().min(1).default("127.0.0.1"),
    port: z.coerce.number().int().min(0).max(65535).default(8080),
    promptTables: z.string().min(1).default(join(REPO_ROOT, "prompt-tables")),
    adapters: z.string().min(1).default(join(REPO_ROOT, "adapters")),
    cacheDir: z
      .string()
      .min(1)
      .default(join(process.env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "taskmux")),
    threads: z.coerce.number().int().min(1).max(256).default(availableParallelism()),
    /** onnxruntime threads spin between the ops of a step (stopping after it); for cores no other process uses. */
    spin: z.coerce.boolean().default(false),
    maxNumSeqs: positiveInt.max(1024).default(32),
    maxBatchedTokens: positiveInt.default(256),
    maxWaiting: positiveInt.default(256),
    kvCacheMb: positiveInt.default(1024),
    maxResidentAdapters: positiveInt.max(256).default(8),
    maxHostAdapters: positiveInt.default(64),
    maxLoraRank: positiveInt.max(512).default(16),
    maxBottleneckSize: positiveInt.max(4096).default(64),
    bodyLimitMb: z.coerce.number().positive().default(1),
    maxN: positiveInt.max(128).default(16),
    /** Longest prompt in tokens; 0 = the model's context window. */
    maxPromptTokens: z.coerce.number().int().nonnegative().default(0),
    /** Generation requests in flight per client address; 0 = unlimited. */
    maxStreamsPerClient: z.coerce.number().int().nonnegative().default(0),
    requestTimeoutS: z.coerce.number().positive().default(600),
    drainTimeoutS: z.coerce.number().nonnegative().default(30),
    logPrompts: z.coerce.boolean().default(false),
    logLevel: z.enum(["debug", "info", "warn", "error"]).default("info"),
    adminToken: z.string().min(1).optional(),
    /** Watch the task roots and load, replace and unload tasks as their folders change. */
    watch: z.coerce.boolean().default(true),
    /** Full rescan of the task roots every N seconds, the safety net for missed events (0 = never). */
    rescanIntervalS: z.coerce.number().nonnegative().default(5),
    /** Hosts PUT /v1/tasks/{name} may fetch a task archive from (comma-separated; empty = URL loads off). */
    adapterUrlAllow: z
      .string()
      .default("")
      .transform((s) =>
        s
          .split(",")
          .map((h) => h.trim())
          .filter((h) => h !== ""),
      ),
    adapterUrlMaxMb: z.coerce.number().positive().default(512),
    /**
     * The PEFT kinds the graph carries paths for: a comma-separated list of lora, ia3, bottleneck, or none.
     * A kind left out costs nothing per step (none: batch-1 decode 1.07x served, 1.09-1.18x at the runner; docs/weight-formats.md) and its
     * adapters are refused; soft prompts and prefix tuning need no PEFT paths.
     */
    peft: z
      .string()
      .default(PEFT_KINDS.join(","))
      .transform((text, ctx) => {
        const words = text
          .split(",")
          .map((w) => w.trim().toLowerCase())
          .filter((w) => w !== "");
        if (words.length === 1 && words[0] === "none") return [];
        const unknown = words.filter((w) => !(PEFT_KINDS as readonly string[]).includes(w));
        if (words.length === 0 || unknown.length > 0) {
          ctx.issues.push({
            code: "custom",
            input: text,
            message: `expected a comma-separated list of ${PEFT_KINDS.join(", ")}, or none; got ${JSON.stringify(text)}`,
          });
          return z.NEVER;
        }
        return PEFT_KINDS.filter((k) => words.includes(k));
      }),
    /** How the graph stores and multiplies the base weights (model/builder/quantize.ts WEIGHT_FORMATS). */
    weights: z.enum(["fp32", "fp16", "int8", "int4"]).default("fp32"),
    /** int8/int4: values per quantisation block (a power of two from 16 to 256; larger is faster, less exact). */
    quantBlockSize: z.coerce
      .number()
      .refine((n): n is 16 | 32 | 64 | 128 | 256 => [16, 32, 64, 128, 256].includes(n), {
        message: "must be one of 16, 32, 64, 128, 256 (MatMulNBits block sizes)",
      })
      .default(32),
    /** Execution provider (model/device.ts); `auto` = the first of cuda, webgpu, cpu that initialises. */
    device: z.enum(["cpu", "webgpu", "cuda", "auto"]).default("cpu"),
    /** Run the model in-process instead of in a worker thread (tests, debugging). */
    inProcess: z.coerce.boolean().default(false),
  })
  .check((ctx) => {
    if (ctx.value.maxBatchedTokens < ctx.value.maxNumSeqs) {
      ctx.issues.push({
        code: "custom",
        input: ctx.value.maxBatchedTokens,
        path: ["maxBatchedTokens"],
        message: `--max-batched-tokens (${ctx.value.maxBatchedTokens}) must be at least --max-num-seqs (${ctx.value.maxNumSeqs}) so every running sequence can decode each step`,
      });
    }
  });

export type Config = Readonly<z.infer<typeof configSchema>>;

const FLAGS = {
  model: "string",
  host: "string",
  port: "string",
  "prompt-tables": "string",
  adapters: "string",
  "cache-dir": "string",
  threads: "string",
  spin: "boolean",
  "max-num-seqs": "string",
  "max-batched-tokens": "string",
  "max-waiting": "string",
  "kv-cache-mb": "string",
  "max-resident-adapters": "string",
  "max-host-adapters": "string",
  "max-lora-rank": "string",
  "max-bottleneck-size": "string",
  "body-limit-mb": "string",
  "max-n": "string",
  "max-prompt-tokens": "string",
  "max-streams-per-client": "string",
  "request-timeout-s": "string",
  "drain-timeout-s": "string",
  "log-prompts": "boolean",
  "log-level": "string",
  "in-process": "boolean",
  peft: "string",
  weights: "string",
  "quant-block-size": "string",
  device: "string",
  watch: "boolean",
  "no-watch": "boolean",
  "rescan-interval-s": "string",
  "adapter-url-allow": "string",
  "adapter-url-max-mb": "string",
} as const;

const camel = (flag: string) => flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

export class ConfigError extends Error {}

/** A boolean flag's value; from the environment only true/false, 1/0, yes/no, on/off (z.coerce would read "0" as true). */
function booleanOption(flag: string, value: string | boolean): boolean {
  if (typeof value === "boolean") return value;
  const word = value.trim().toLowerCase();
  if (["true", "1", "yes", "on"].includes(word)) return true;
  if (["false", "0", "no", "off", ""].includes(word)) return false;
  throw new ConfigError(`--${flag}: expected true or false, got ${JSON.stringify(value)}`);
}

/** Flags win over environment variables (TASKMUX_<FLAG>, plus HOST, PORT and TASKMUX_ADMIN_TOKEN). */
export function parseConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): Config {
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: argv,
      options: Object.fromEntries(Object.entries(FLAGS).map(([k, type]) => [k, { type }])),
      strict: true,
      allowPositionals: false,
    }).values as Record<string, string | boolean | undefined>;
  } catch (error) {
    throw new ConfigError((error as Error).message);
  }
  const raw: Record<string, unknown> = {};
  for (const flag of Object.keys(FLAGS)) {
    const envValue = env[`TASKMUX_${flag.toUpperCase().replaceAll("-", "_")}`];
    const value = values[flag] ?? envValue;
    if (value === undefined) continue;
    raw[camel(flag)] = FLAGS[flag as keyof typeof FLAGS] === "boolean" ? booleanOption(flag, value) : value;
  }
  // Node 20's parseArgs has no negated booleans: `--no-watch` (or TASKMUX_WATCH=false) turns watching off.
  if (raw.noWatch === true) raw.watch = false;
  delete raw.noWatch;
  raw.host ??= env.HOST;
  raw.port ??= env.PORT;
  raw.adminToken = env.TASKMUX_ADMIN_TOKEN || undefined;
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const flag = String(issue.path[0] ?? "").replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
    throw new ConfigError(`--${flag}: ${issue.message}`);
  }
  return Object.freeze(parsed.data);
}
