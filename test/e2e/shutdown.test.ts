/**
 * Graceful shutdown of the real server (src/main.ts as a child process, tiny model): SIGTERM stops admitting at
 * once (new requests 503, /ready 503) while running streams finish normally (finish_reason + [DONE]), then the
 * process exits 0; a second signal during the drain exits at once.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type ServerHandle, startServer } from "../../bench/server-process.ts";
import { parseSse, withTimeout } from "../helpers/server.ts";
import { madeModelDir, TEST_CACHE_DIR } from "../helpers/tiny-model.ts";

/** Enough concurrent long streams that the drain lasts well past the probes (seconds on the tiny model). */
const NUM_STREAMS = 12;
const MAX_TOKENS = 480;

let emptyTasks: string;
before(() => {
  emptyTasks = mkdtempSync(join(tmpdir(), "taskmux-shutdown-"));
});
after(() => {
  rmSync(emptyTasks, { recursive: true, force: true });
});

function start(): Promise<ServerHandle> {
  const roots = ["--prompt-tables", emptyTasks, "--adapters", emptyTasks];
  const args = [
    "--model",
    madeModelDir(),
    "--cache-dir",
    TEST_CACHE_DIR,
    "--drain-timeout-s",
    "60",
    ...roots,
  ];
  return startServer(args, { readyTimeoutMs: 120_000 });
}

function exited(server: ServerHandle): Promise<{ code: number | null; signal: string | null }> {
  const { child } = server;
  if (child.exitCode !== null || child.signalCode !== null)
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
}

type Usage = { completion_tokens: number } | null;

interface OpenStream {
  /** Resolves with the whole SSE body (rejects if the connection is cut). */
  rest: Promise<string>;
}

/** Starts a long stream and resolves once its first chunk has arrived (the sequence is running). */
async function openStream(baseUrl: string): Promise<OpenStream> {
  const res = await fetch(`${baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      prompt: "Once upon a time",
      max_tokens: MAX_TOKENS,
      ignore_eos: true,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let text = "";
  const first = await reader.read();
  text += decoder.decode(first.value, { stream: true });
  const rest = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return text;
      text += decoder.decode(value, { stream: true });
    }
  })();
  rest.catch(() => {});
  return { rest };
}

const postCompletion = (baseUrl: string) =>
  fetch(`${baseUrl}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt: "Hello", max_tokens: 4 }),
  });

test("SIGTERM: new requests get 503 at once, running streams finish with [DONE], the process exits 0", async () => {
  const server = await start();
  try {
    const streams = await withTimeout(
      Promise.all(Array.from({ length: NUM_STREAMS }, () => openStream(server.baseUrl))),
      30_000,
      "the streams' first chunks",
    );
    const code = exited(server);
    server.child.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 50));
    const t0 = performance.now();
    const refused = await postCompletion(server.baseUrl);
    const refusedMs = performance.now() - t0;
    assert.equal(refused.status, 503);
    assert.ok(refused.headers.get("retry-after"), "503 carries Retry-After");
    const body = (await refused.json()) as { error: { type: string; message: string } };
    assert.equal(body.error.type, "shutting_down");
    assert.ok(refusedMs < 500, `the refusal took ${refusedMs.toFixed(0)} ms`);
    const ready = await fetch(`${server.baseUrl}/ready`);
    assert.equal(ready.status, 503);
    await ready.body?.cancel();
    const texts = await withTimeout(Promise.all(streams.map((s) => s.rest)), 60_000, "the drained streams");
    for (const text of texts) {
      const frames = parseSse(text);
      assert.equal(frames.at(-1), "[DONE]");
      const chunks = frames.slice(0, -1) as { choices: { finish_reason: string | null }[]; usage: Usage }[];
      const reasons = chunks.flatMap((c) => c.choices.map((choice) => choice.finish_reason)).filter(Boolean);
      assert.deepEqual(reasons, ["length"]);
      assert.equal(chunks.at(-1)!.usage?.completion_tokens, MAX_TOKENS, "every token was generated");
    }
    assert.deepEqual(await withTimeout(code, 20_000, "the process exit"), { code: 0, signal: null });
  } finally {
    await server.stop();
  }
});

test("a second SIGTERM during the drain exits at once", async () => {
  const server = await start();
  try {
    const streams = await withTimeout(
      Promise.all(Array.from({ length: NUM_STREAMS }, () => openStream(server.baseUrl))),
      30_000,
      "the streams' first chunks",
    );
    const code = exited(server);
    server.child.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(server.child.exitCode, null, "still draining after the first signal");
    const t0 = performance.now();
    server.child.kill("SIGTERM");
    const result = await withTimeout(code, 5_000, "the exit after the second signal");
    const exitMs = performance.now() - t0;
    // Status 1, not a crash: the model worker is stopped first (exiting inside session.run aborts).
    assert.deepEqual(result, { code: 1, signal: null });
    assert.ok(exitMs < 1000, `exited ${exitMs.toFixed(0)} ms after the second signal`);
    // A stream cut by the exit ends in an error; one still pending after a while counts as cut too.
    const cut = new Promise<null>((r) => setTimeout(() => r(null), 5_000));
    const outcomes = await Promise.all(streams.map((s) => Promise.race([s.rest.catch(() => null), cut])));
    // The streams end early (cancelled, or cut by the exit): none got its 480 tokens.
    const numTokens = (text: string | null) => {
      const usage = text?.match(/"completion_tokens":(\d+)/g)?.at(-1);
      return Number(usage?.split(":")[1] ?? 0);
    };
    assert.deepEqual(
      outcomes.filter((text) => numTokens(text) >= MAX_TOKENS),
      [],
      "the drain was cut short",
    );
  } finally {
    if (server.child.exitCode === null && server.child.signalCode === null) await server.stop();
  }
});
