/** Tests for parseConfig: defaults, flag/env precedence, HOST/PORT, admin token, and rejections naming the flag. */
import assert from "node:assert/strict";
import { availableParallelism } from "node:os";
import { test } from "node:test";
import { ConfigError, parseConfig } from "../src/config.ts";

/** parseConfig with an explicit (never the process's) environment. */
const parse = (argv: string[] = [], env: Record<string, string> = {}) => parseConfig(argv, env);

/** Asserts a ConfigError whose message starts with the flag and matches `pattern`. */
function assertConfigError(argv: string[], env: Record<string, string>, flag: string, pattern?: RegExp) {
  assert.throws(
    () => parse(argv, env),
    (error: unknown) => {
      assert.ok(error instanceof ConfigError, String(error));
      assert.ok(error.message.includes(flag), `"${error.message}" does not name ${flag}`);
      if (pattern) assert.match(error.message, pattern);
      return true;
    },
  );
}

test("an empty command line and environment give the documented defaults", () => {
  const config = parse();
  assert.equal(config.host, "127.0.0.1");
  assert.equal(config.port, 8080);
  assert.equal(config.maxNumSeqs, 32);
  assert.equal(config.maxBatchedTokens, 256);
  assert.equal(config.maxWaiting, 256);
  assert.equal(config.kvCacheMb, 1024);
  assert.equal(config.maxResidentAdapters, 8);
  assert.equal(config.maxLoraRank, 16);
  assert.equal(config.weights, "fp32");
  assert.equal(config.quantBlockSize, 32);
  assert.equal(config.spin, false);
  assert.equal(config.threads, availableParallelism());
  assert.equal(config.logLevel, "info");
  assert.equal(config.logPrompts, false);
  assert.equal(config.inProcess, false);
  assert.equal(config.adminToken, undefined);
  assert.match(config.model, /models[/\\]default$/);
  assert.ok(Object.isFrozen(config));
});

test("flags are parsed into typed values", () => {
  const config = parse([
    "--port",
    "9000",
    "--max-num-seqs",
    "4",
    "--max-batched-tokens=512",
    "--body-limit-mb",
    "2.5",
    "--log-level",
    "debug",
    "--log-prompts",
    "--in-process",
    "--model",
    "/models/x",
    "--weights",
    "int4",
    "--quant-block-size",
    "128",
    "--spin",
    "--peft",
    " IA3,lora ",
  ]);
  assert.equal(config.port, 9000);
  assert.equal(config.maxNumSeqs, 4);
  assert.equal(config.maxBatchedTokens, 512);
  assert.equal(config.bodyLimitMb, 2.5);
  assert.equal(config.logLevel, "debug");
  assert.equal(config.logPrompts, true);
  assert.equal(config.inProcess, true);
  assert.equal(config.model, "/models/x");
  assert.equal(config.weights, "int4");
  assert.equal(config.quantBlockSize, 128);
  assert.equal(config.spin, true);
  assert.deepEqual(config.peft, ["lora", "ia3"], "kinds in canonical order, case and spaces ignored");
  assert.deepEqual(parse(["--peft", "none"]).peft, []);
  assert.deepEqual(parse([]).peft, ["lora", "ia3", "bottleneck"]);
});

test("TASKMUX_* environment variables set options and flags beat them", () => {
  const env = { TASKMUX_MAX_NUM_SEQS: "8", TASKMUX_KV_CACHE_MB: "64", TASKMUX_LOG_LEVEL: "warn" };
  const fromEnv = parse([], env);
  assert.equal(fromEnv.maxNumSeqs, 8);
  assert.equal(fromEnv.kvCacheMb, 64);
  assert.equal(fromEnv.logLevel, "warn");
  const flagged = parse(["--max-num-seqs", "16", "--log-level", "error"], env);
  assert.equal(flagged.maxNumSeqs, 16);
  assert.equal(flagged.logLevel, "error");
  assert.equal(flagged.kvCacheMb, 64, "options without a flag still come from the environment");
});

test("boolean options read true/false, 1/0, yes/no and on/off from the environment", () => {
  const cases: [text: string, value: boolean][] = [
    ["true", true],
    ["1", true],
    ["YES", true],
    ["on", true],
    ["false", false],
    ["0", false],
    ["no", false],
    ["Off", false],
    ["", false],
  ];
  for (const [text, value] of cases) {
    assert.equal(parse([], { TASKMUX_LOG_PROMPTS: text }).logPrompts, value, `TASKMUX_LOG_PROMPTS=${text}`);
    assert.equal(parse([], { TASKMUX_IN_PROCESS: text }).inProcess, value, `TASKMUX_IN_PROCESS=${text}`);
  }
  assert.equal(parse(["--log-prompts"], { TASKMUX_LOG_PROMPTS: "0" }).logPrompts, true, "the flag wins");
  assertConfigError([], { TASKMUX_LOG_PROMPTS: "maybe" }, "--log-prompts", /"maybe"/);
});

test("HOST and PORT apply, below TASKMUX_HOST/TASKMUX_PORT and flags", () => {
  const cases: { name: string; argv: string[]; env: Record<string, string>; host: string; port: number }[] = [
    {
      name: "plain HOST/PORT",
      argv: [],
      env: { HOST: "0.0.0.0", PORT: "3000" },
      host: "0.0.0.0",
      port: 3000,
    },
    {
      name: "TASKMUX_* beat HOST/PORT",
      argv: [],
      env: { HOST: "0.0.0.0", PORT: "3000", TASKMUX_HOST: "::", TASKMUX_PORT: "4000" },
      host: "::",
      port: 4000,
    },
    {
      name: "flags beat everything",
      argv: ["--host", "localhost", "--port", "5000"],
      env: { HOST: "0.0.0.0", PORT: "3000", TASKMUX_HOST: "::", TASKMUX_PORT: "4000" },
      host: "localhost",
      port: 5000,
    },
    { name: "port 0 asks for any port", argv: ["--port", "0"], env: {}, host: "127.0.0.1", port: 0 },
  ];
  for (const c of cases) {
    const config = parse(c.argv, c.env);
    assert.equal(config.host, c.host, c.name);
    assert.equal(config.port, c.port, c.name);
  }
});

test("TASKMUX_ADMIN_TOKEN sets the admin token; an empty one means none", () => {
  assert.equal(parse([], { TASKMUX_ADMIN_TOKEN: "s3cret" }).adminToken, "s3cret");
  assert.equal(parse([], { TASKMUX_ADMIN_TOKEN: "" }).adminToken, undefined);
});

test("invalid values are ConfigErrors naming the flag", () => {
  const cases: { argv: string[]; env?: Record<string, string>; flag: string }[] = [
    { argv: ["--port", "abc"], flag: "--port" },
    { argv: ["--port", "70000"], flag: "--port" },
    { argv: [], env: { PORT: "-1" }, flag: "--port" },
    { argv: ["--max-num-seqs", "0"], flag: "--max-num-seqs" },
    { argv: ["--max-num-seqs", "2.5"], flag: "--max-num-seqs" },
    { argv: ["--max-num-seqs", "2000"], flag: "--max-num-seqs" },
    { argv: [], env: { TASKMUX_KV_CACHE_MB: "lots" }, flag: "--kv-cache-mb" },
    { argv: ["--threads", "0"], flag: "--threads" },
    { argv: ["--log-level", "verbose"], flag: "--log-level" },
    { argv: ["--body-limit-mb", "-1"], flag: "--body-limit-mb" },
    { argv: ["--max-lora-rank", "1024"], flag: "--max-lora-rank" },
    { argv: ["--quant-block-size", "48"], flag: "--quant-block-size" },
    { argv: ["--peft", "lora,prefix"], flag: "--peft" },
    { argv: ["--peft", "none,lora"], flag: "--peft" },
    { argv: ["--peft", ","], flag: "--peft" },
  ];
  for (const c of cases) assertConfigError(c.argv, c.env ?? {}, c.flag);
});

test("max-batched-tokens below max-num-seqs is rejected naming both", () => {
  assertConfigError(
    ["--max-num-seqs", "64", "--max-batched-tokens", "32"],
    {},
    "--max-batched-tokens",
    /--max-num-seqs \(64\)/,
  );
  assert.equal(parse(["--max-num-seqs", "64", "--max-batched-tokens", "64"]).maxBatchedTokens, 64);
});

test("unknown flags and positional arguments are rejected", () => {
  assertConfigError(["--max-num-seq", "4"], {}, "--max-num-seq");
  assertConfigError(["--admin-token", "x"], {}, "--admin-token");
  assert.throws(() => parse(["serve"]), ConfigError);
});
