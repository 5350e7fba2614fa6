/** @module config — one zod schema for command-line flags and environment; parsed once into a frozen Config. */
import { availableParallelism, homedir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { z } from "zod";

const REPO_ROOT = resolve(import.meta.dirname, "..");

const positiveInt = z.coerce.number().int().positive();

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
    requestTimeoutS: z.coerce.number().positive().default(600),
    drainTimeoutS: z.coerce.number().nonnegative().default(30),
    logPrompts: z.coerce.boolean().default(false),
    logLevel: z.enum(["debug", "info", "warn", "error"]).default("info"),
    adminToken: z.string().min(1).optional(),
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
  "request-timeout-s": "string",
  "drain-timeout-s": "string",
  "log-prompts": "boolean",
  "log-level": "string",
  "in-process": "boolean",
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
