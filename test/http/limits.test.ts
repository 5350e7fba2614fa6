/**
 * Limits and hardening, end to end through createApp and the real engine on the tiny model (context 512):
 * config defaults, body size, prompt tokens, max_tokens against the context window (400 naming both numbers,
 * never clamped), truncate_field, parameter ranges, the waiting queue (429 + Retry-After), the per-request
 * deadline, concurrent streams per client address, and the per-request access-log line (no prompt text).
 */
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { parseConfig } from "../../src/config.ts";
import { createApp } from "../../src/http/app.ts";
import { configureLogging } from "../../src/log.ts";
import { type FaultyStack, faultyStack } from "../helpers/faulty-backend.ts";
import { parseSse, postJson, startServer, withTimeout } from "../helpers/server.ts";
import { loadTestModel, startTestStack, type TestStack } from "../helpers/tiny-model.ts";

type ErrorBody = { error: { message: string; type: string; param: string | null; code: string } };
type Completion = {
  choices: { text: string; finish_reason: string }[];
  usage: { prompt_tokens: number; completion_tokens: number };
};

/** A FaultyStack on its own model instance (its own KV store), disposed by the caller. */
async function ownFaultyStack(options: Parameters<typeof faultyStack>[1]): Promise<FaultyStack> {
  return faultyStack(await loadTestModel(), options);
}

/** Waits until no sequence is running or waiting (cancelled ones leave at the next step boundary). */
async function waitIdle(engine: { numRunningSequences: number; numWaitingSequences: number }) {
  await withTimeout(
    (async () => {
      while (engine.numRunningSequences + engine.numWaitingSequences > 0)
        await new Promise((r) => setTimeout(r, 10));
    })(),
    5_000,
    "the engine to go idle",
  );
}

function assertIdle(engine: {
  numRunningSequences: number;
  numWaitingSequences: number;
  kv: { usageFraction: number };
}) {
  assert.equal(engine.numRunningSequences, 0);
  assert.equal(engine.numWaitingSequences, 0);
  assert.equal(engine.kv.usageFraction, 0);
}

/** Reads a streamed response until `n` chunks arrived; returns the reader to continue or cancel. */
async function readChunks(res: Response, n: number) {
  const reader = res.body!.getReader();
  for (let i = 0; i < n; i++) assert.ok(!(await withTimeout(reader.read(), 10_000, "a chunk")).done);
  return reader;
}

test("limits have documented defaults, parse from flags, and the server binds to loopback unless HOST says", () => {
  const config = parseConfig([], {});
  assert.equal(config.host, "127.0.0.1");
  assert.equal(config.bodyLimitMb, 1);
  assert.equal(config.maxPromptTokens, 0, "0 = the context window");
  assert.equal(config.maxN, 16);
  assert.equal(config.maxWaiting, 256);
  assert.equal(config.requestTimeoutS, 600);
  assert.equal(config.drainTimeoutS, 30);
  assert.equal(config.maxStreamsPerClient, 0, "0 = unlimited");
  assert.equal(parseConfig([], { HOST: "0.0.0.0" }).host, "0.0.0.0");
  const flags = parseConfig(["--max-streams-per-client", "3", "--max-prompt-tokens", "100"], {});
  assert.equal(flags.maxStreamsPerClient, 3);
  assert.equal(flags.maxPromptTokens, 100);
  assert.equal(parseConfig([], { TASKMUX_MAX_STREAMS_PER_CLIENT: "5" }).maxStreamsPerClient, 5);
  assert.throws(() => parseConfig(["--max-streams-per-client", "-1"], {}), /--max-streams-per-client/);
});

describe("request limits on the real engine", () => {
  let stack: TestStack;
  let app: ReturnType<typeof createApp>;
  before(async () => {
    stack = await startTestStack();
    app = createApp({ service: stack.service, bodyLimitBytes: 4096 });
  });
  after(async () => {
    await stack.dispose();
  });

  test("a body over the limit is 413 in OpenAI's shape", async () => {
    const res = await postJson(app, "/v1/completions", { prompt: "a".repeat(5000) });
    assert.equal(res.status, 413);
    const { error } = (await res.json()) as ErrorBody;
    assert.equal(error.type, "payload_too_large");
    assert.match(error.message, /4096 bytes/);
  });

  test("prompt + max_tokens beyond the context window is 400 naming both numbers, never clamped", async () => {
    const prompt = Array(500).fill(5);
    const res = await postJson(app, "/v1/completions", { prompt, max_tokens: 20 });
    assert.equal(res.status, 400);
    const { error } = (await res.json()) as ErrorBody;
    assert.equal(error.param, "max_tokens");
    assert.match(
      error.message,
      /prompt \(500 tokens\) \+ max_tokens \(20\) = 520 exceeds the context window of 512/,
    );
    const fits = await postJson(app, "/v1/completions", { prompt, max_tokens: 12, ignore_eos: true });
    assert.equal(fits.status, 200);
    assert.equal(
      ((await fits.json()) as Completion).usage.completion_tokens,
      12,
      "exactly the context, all generated",
    );
    const tooLong = await postJson(app, "/v1/completions", { prompt: Array(513).fill(5), max_tokens: 0 });
    assert.equal(tooLong.status, 400);
    assert.match(((await tooLong.json()) as ErrorBody).error.message, /513 tokens/);
    assertIdle(stack.engine);
  });

  test("parameter ranges: out of range is 400 naming the field, the boundaries are accepted", async () => {
    const refused: [Record<string, unknown>, string, number][] = [
      [{ temperature: -0.5 }, "temperature", 400],
      [{ top_p: 0 }, "top_p", 400],
      [{ top_p: 1.01 }, "top_p", 400],
      [{ n: 0 }, "n", 400],
      [{ n: 17 }, "n", 400],
      [{ stop: ["a", "b", "c", "d", "e"] }, "stop", 400],
      [{ logprobs: 6 }, "logprobs", 400],
      [{ logprobs: -1 }, "logprobs", 400],
      [{ model: "no-such-model" }, "model", 404],
      [{ model: "../../etc/passwd" }, "model", 404],
    ];
    for (const [fields, param, status] of refused) {
      const res = await postJson(app, "/v1/completions", { prompt: "Hi", max_tokens: 1, ...fields });
      assert.equal(res.status, status, JSON.stringify(fields));
      assert.equal(((await res.json()) as ErrorBody).error.param, param);
    }
    const infinite = await postJson(app, "/v1/completions", '{"prompt":"Hi","temperature":1e999}');
    assert.equal(infinite.status, 400, "temperature must be finite");
    const chat = { messages: [{ role: "user", content: "Hi" }], max_tokens: 1, logprobs: true };
    for (const top_logprobs of [-1, 21]) {
      const res = await postJson(app, "/v1/chat/completions", { ...chat, top_logprobs });
      assert.equal(res.status, 400);
      assert.equal(((await res.json()) as ErrorBody).error.param, "top_logprobs");
    }
    const accepted: Record<string, unknown>[] = [
      { temperature: 0, top_p: 1, logprobs: 0 },
      { temperature: 2, logprobs: 5, stop: ["a", "b", "c", "d"] },
      { n: 16, seed: 1 },
      { some_unknown_field: { nested: [1, 2] }, frequency_penalty: 0, logit_bias: {} },
    ];
    for (const fields of accepted) {
      const res = await postJson(app, "/v1/completions", { prompt: "Hi", max_tokens: 1, ...fields });
      assert.equal(res.status, 200, JSON.stringify(fields));
    }
    assert.equal((await postJson(app, "/v1/chat/completions", { ...chat, top_logprobs: 20 })).status, 200);
    assertIdle(stack.engine);
  });
});

test("a prompt over --max-prompt-tokens is 400 naming the limit", async () => {
  const s = await ownFaultyStack({ maxPromptTokens: 32 });
  try {
    const app = createApp({ service: s.service });
    const res = await postJson(app, "/v1/completions", { prompt: Array(40).fill(5), max_tokens: 1 });
    assert.equal(res.status, 400);
    const { error } = (await res.json()) as ErrorBody;
    assert.equal(error.param, "prompt");
    assert.match(error.message, /prompt \(40 tokens\) exceeds the limit of 32 prompt tokens/);
    const ok = await postJson(app, "/v1/completions", { prompt: Array(32).fill(5), max_tokens: 1 });
    assert.equal(ok.status, 200);
  } finally {
    await s.engine.dispose();
  }
});

test("an over-long prompt is 400 unless the task's truncate_field allows cutting it", async () => {
  const root = mkdtempSync(join(tmpdir(), "taskmux-limits-"));
  const task = {
    prompt_template: "Passage: {passage}\nSummary:",
    fields: ["passage"],
    query_field: "passage",
  };
  for (const [name, extra] of [
    ["cut", { truncate_field: "passage" }],
    ["nocut", {}],
  ] as const) {
    mkdirSync(join(root, name));
    writeFileSync(join(root, name, "task.json"), JSON.stringify({ ...task, ...extra }));
  }
  const stack = await startTestStack({ taskRoots: [root] });
  try {
    const app = createApp({ service: stack.service });
    const passage = "the cat sat on the mat ".repeat(300);
    // The cut leaves room for max_tokens (default 16): 512 - 16 prompt tokens at most.
    const cut = await postJson(app, "/v1/completions", { model: "cut", prompt: passage });
    assert.equal(cut.status, 200, "the truncated prompt fits with the default max_tokens");
    const used = ((await cut.json()) as Completion).usage;
    assert.ok(used.prompt_tokens <= 496 && used.prompt_tokens > 400, `prompt_tokens ${used.prompt_tokens}`);
    const nocut = await postJson(app, "/v1/completions", { model: "nocut", prompt: passage, max_tokens: 1 });
    assert.equal(nocut.status, 400);
    assert.match(((await nocut.json()) as ErrorBody).error.message, /exceeds the context window of 512/);
  } finally {
    await stack.dispose();
    rmSync(root, { recursive: true, force: true });
  }
});

test("a full waiting queue answers 429 with Retry-After; the queued requests are unaffected", async () => {
  const s = await ownFaultyStack({ maxNumSeqs: 1, maxWaiting: 1 });
  s.backend.faults.delayMs = 20;
  try {
    const app = createApp({ service: s.service });
    const body = { prompt: "Once upon a time", max_tokens: 300, ignore_eos: true, stream: true };
    const running = await postJson(app, "/v1/completions", body);
    const waiting = await postJson(app, "/v1/completions", body);
    assert.equal(s.engine.numRunningSequences, 1);
    assert.equal(s.engine.numWaitingSequences, 1);
    const refused = await postJson(app, "/v1/completions", { ...body, stream: false });
    assert.equal(refused.status, 429);
    assert.equal(refused.headers.get("retry-after"), "1");
    const { error } = (await refused.json()) as ErrorBody;
    assert.equal(error.type, "overloaded");
    assert.match(error.message, /waiting queue is full \(1 requests\)/);
    await (await readChunks(running, 2)).cancel();
    await (await readChunks(waiting, 2)).cancel();
    await waitIdle(s.engine);
    assertIdle(s.engine);
  } finally {
    await s.engine.dispose();
  }
});

test("--request-timeout-s ends a stream with finish_reason length and [DONE], and frees its slot", async () => {
  const s = await ownFaultyStack({ requestTimeoutMs: 300 });
  s.backend.faults.delayMs = 30;
  try {
    const app = createApp({ service: s.service });
    const body = {
      prompt: "Once upon a time",
      max_tokens: 300,
      ignore_eos: true,
      stream_options: { include_usage: true },
    };
    const started = performance.now();
    const streamed = await postJson(app, "/v1/completions", { ...body, stream: true });
    const frames = parseSse(await withTimeout(streamed.text(), 10_000, "the stream"));
    assert.ok(performance.now() - started < 3_000);
    assert.equal(frames.at(-1), "[DONE]");
    const chunks = frames.slice(0, -1) as {
      choices: { finish_reason: string | null }[];
      usage?: { completion_tokens: number };
    }[];
    assert.deepEqual(chunks.flatMap((c) => c.choices.map((x) => x.finish_reason)).filter(Boolean), [
      "length",
    ]);
    assert.ok(chunks.at(-1)!.usage!.completion_tokens < 300);
    const plain = await postJson(app, "/v1/completions", body);
    const json = (await plain.json()) as Completion;
    assert.equal(json.choices[0]!.finish_reason, "length");
    assert.ok(json.usage.completion_tokens < 300);
    assertIdle(s.engine);
  } finally {
    await s.engine.dispose();
  }
});

test("--max-streams-per-client: beyond N in flight from one address is 429; an ended stream frees its place", async () => {
  const s = await ownFaultyStack({});
  s.backend.faults.delayMs = 20;
  const server = await startServer(createApp({ service: s.service, maxStreamsPerClient: 2 }));
  const post = (body: Record<string, unknown>) =>
    fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  try {
    const long = { prompt: "Once upon a time", max_tokens: 400, ignore_eos: true, stream: true };
    const first = await readChunks(await post(long), 2);
    const second = await readChunks(await post(long), 2);
    const refused = await post({ prompt: "Hi", max_tokens: 1 });
    assert.equal(refused.status, 429);
    assert.equal(refused.headers.get("retry-after"), "1");
    const { error } = (await refused.json()) as ErrorBody;
    assert.equal(error.type, "overloaded");
    assert.match(error.message, /already has 2 generation requests in flight \(--max-streams-per-client 2\)/);
    assert.equal((await fetch(`${server.url}/v1/models`)).status, 200, "other routes are not counted");
    await first.cancel();
    const admitted = await withTimeout(
      (async () => {
        for (;;) {
          const res = await post({ prompt: "Hi", max_tokens: 2 });
          if (res.status !== 429) return res;
          await res.body?.cancel();
          await new Promise((r) => setTimeout(r, 20));
        }
      })(),
      5_000,
      "a place to free up",
    );
    assert.equal(admitted.status, 200);
    await second.cancel();
    await waitIdle(s.engine);
    assertIdle(s.engine);
  } finally {
    await server.close();
    await s.engine.dispose();
  }
});

test("each request logs one info line with id, route, status, task, tokens and duration, and no prompt text", async () => {
  const stack = await startTestStack();
  const lines: string[] = [];
  const write = process.stdout.write;
  process.stdout.write = ((chunk: string | Uint8Array) => {
    lines.push(String(chunk));
    return true;
  }) as typeof process.stdout.write;
  configureLogging({ level: "debug", format: "json" });
  try {
    const secret = "SECRET-PROMPT-TEXT";
    for (const logPrompts of [false, true]) {
      lines.length = 0;
      const app = createApp({ service: stack.service, logPrompts });
      const res = await postJson(
        app,
        "/v1/completions",
        { prompt: secret, max_tokens: 3, ignore_eos: true, stream: true },
        { "X-Request-Id": `req-${logPrompts}` },
      );
      await res.text();
      await postJson(
        app,
        "/v1/completions",
        { prompt: secret, temperature: -1 },
        { "X-Request-Id": `bad-${logPrompts}` },
      );
      const records = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
      const ours = [`req-${logPrompts}`, `bad-${logPrompts}`];
      const requests = records.filter((r) => r.msg === "request" && ours.includes(r.requestId as string));
      assert.equal(requests.length, 2, JSON.stringify(requests));
      const { time: _time, durationMs, ...line } = requests[0]!;
      assert.equal(typeof durationMs, "number");
      assert.deepEqual(line, {
        level: "info",
        msg: "request",
        module: "http",
        requestId: `req-${logPrompts}`,
        method: "POST",
        route: "/v1/completions",
        status: 200,
        task: null,
        numSequences: 1,
        promptTokens: requests[0]!.promptTokens,
        completionTokens: 3,
      });
      assert.ok((requests[0]!.promptTokens as number) > 0);
      assert.equal(requests[1]!.status, 400);
      assert.equal(
        lines.some((l) => l.includes(secret)),
        logPrompts,
        `prompt text logged only with logPrompts (${logPrompts})`,
      );
    }
  } finally {
    process.stdout.write = write;
    configureLogging({ level: "warn" });
    await stack.dispose();
  }
});
