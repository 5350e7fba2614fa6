/**
 * The real server (src/main.ts as a child process: config, model worker thread, engine, HTTP) driven over
 * loopback: the official `openai` client, task selection, HTTP responsiveness during generation, and KV
 * memory released after a client disconnects.
 */
import assert from "node:assert/strict";
import { request } from "node:http";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";
import { type ServerHandle, startServer } from "../../bench/server-process.ts";
import { madeModelDir, TEST_CACHE_DIR } from "../helpers/tiny-model.ts";

const REPO = fileURLToPath(new URL("../../", import.meta.url));

async function metric(baseUrl: string, name: string): Promise<number> {
  const text = await (await fetch(`${baseUrl}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `));
  return Number(line?.split(" ").at(-1) ?? Number.NaN);
}

/** The real server on the embedded default's shape (so the repository's example tasks fit it) and both task roots. */
function startRepoServer(extraArgs: string[] = []): Promise<ServerHandle> {
  return startServer(
    [
      "--model",
      madeModelDir("default", 0),
      "--cache-dir",
      TEST_CACHE_DIR,
      "--prompt-tables",
      `${REPO}prompt-tables`,
      "--adapters",
      `${REPO}adapters`,
      ...extraArgs,
    ],
    { readyTimeoutMs: 120_000 },
  );
}

describe("the server end to end (default preset, worker thread)", () => {
  let server: ServerHandle;
  let client: OpenAI;

  before(async () => {
    server = await startRepoServer();
    client = new OpenAI({
      baseURL: `${server.baseUrl}/v1`,
      apiKey: "unused",
      maxRetries: 0,
      timeout: 60_000,
    });
  });
  after(async () => {
    await server?.stop();
  });

  test("completions, streaming and not, through the openai client", async () => {
    const r = await client.completions.create({
      model: "default",
      prompt: "Once upon a time",
      max_tokens: 16,
      temperature: 0,
    });
    assert.equal(r.choices[0]!.finish_reason, "length");
    assert.equal(r.usage?.completion_tokens, 16);
    assert.ok(r.choices[0]!.text.length > 0);
    const stream = await client.completions.create({
      model: "default",
      prompt: "Once upon a time",
      max_tokens: 16,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let usage: number | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? "";
      if (chunk.usage) usage = chunk.usage.completion_tokens;
    }
    assert.equal(text, r.choices[0]!.text, "streamed text equals the non-streamed one (greedy)");
    assert.equal(usage, 16);
  });

  test("chat with X-Task through the client's default headers, and the task changes the output", async () => {
    const tasked = new OpenAI({
      baseURL: `${server.baseUrl}/v1`,
      apiKey: "unused",
      maxRetries: 0,
      defaultHeaders: { "X-Task": "lora-demo" },
    });
    const messages = [{ role: "user" as const, content: "Tell me a story" }];
    const base = await client.chat.completions.create({
      model: "default",
      messages,
      max_tokens: 8,
      temperature: 0,
      logprobs: true,
      top_logprobs: 2,
    });
    const lora = await tasked.chat.completions.create({
      model: "default",
      messages,
      max_tokens: 8,
      temperature: 0,
      logprobs: true,
    });
    assert.equal(base.choices[0]!.logprobs?.content?.length, base.usage?.completion_tokens);
    assert.equal(base.choices[0]!.logprobs?.content?.[0]?.top_logprobs.length, 2);
    // Random weights may emit the same unprintable bytes as text; compare the tokens' bytes.
    const bytesOf = (r: typeof base) => JSON.stringify(r.choices[0]!.logprobs?.content?.map((c) => c.bytes));
    assert.notEqual(bytesOf(lora), bytesOf(base), "the LoRA task generates other tokens than the base");
    const streamed = await tasked.chat.completions.create({
      model: "default",
      messages,
      max_tokens: 8,
      temperature: 0,
      stream: true,
    });
    let content = "";
    for await (const chunk of streamed) content += chunk.choices[0]?.delta?.content ?? "";
    assert.equal(content, lora.choices[0]!.message.content);
  });

  test("n: 3 with a fixed seed returns three completions, the same on a second call", async () => {
    const ask = () =>
      client.completions.create({
        model: "default",
        prompt: "Hello",
        max_tokens: 8,
        n: 3,
        seed: 42,
        temperature: 1,
      });
    const [a, b] = [await ask(), await ask()];
    assert.equal(a.choices.length, 3);
    assert.deepEqual(
      a.choices.map((c) => c.text),
      b.choices.map((c) => c.text),
    );
    assert.ok(new Set(a.choices.map((c) => c.text)).size > 1, "the three choices are sampled independently");
  });

  test("/health answers within 50 ms while long generations are in flight", async () => {
    const prompt = "a b c d e f g h ".repeat(150);
    const load = Array.from({ length: 12 }, () =>
      client.completions.create({
        model: "default",
        prompt,
        max_tokens: 64,
        temperature: 0,
        ignore_eos: true,
      } as never),
    );
    await new Promise((r) => setTimeout(r, 100));
    const latencies: number[] = [];
    for (let i = 0; i < 15; i++) {
      const t0 = performance.now();
      const res = await fetch(`${server.baseUrl}/health`);
      latencies.push(performance.now() - t0);
      assert.equal(res.status, 200);
      await new Promise((r) => setTimeout(r, 20));
    }
    const running = await metric(server.baseUrl, "vllm:num_requests_running");
    await Promise.all(load);
    assert.ok(running > 0, "generations were running while /health was probed");
    assert.ok(Math.max(...latencies) < 50, `slowest /health took ${Math.max(...latencies).toFixed(1)} ms`);
  });

  test("a client that disconnects mid-stream frees its sequence and KV reservation", async () => {
    const url = new URL(`${server.baseUrl}/v1/completions`);
    await new Promise<void>((resolve, reject) => {
      const req = request(
        {
          host: url.hostname,
          port: url.port,
          path: url.pathname,
          method: "POST",
          headers: { "content-type": "application/json" },
        },
        (res) => {
          res.once("data", () => {
            req.destroy();
            resolve();
          });
        },
      );
      req.on("error", (e) => ((e as NodeJS.ErrnoException).code === "ECONNRESET" ? resolve() : reject(e)));
      req.end(
        JSON.stringify({ prompt: "Once", max_tokens: 1500, stream: true, ignore_eos: true, temperature: 0 }),
      );
    });
    const deadline = Date.now() + 2000;
    let usage = Number.NaN;
    while (Date.now() < deadline) {
      usage = await metric(server.baseUrl, "vllm:gpu_cache_usage_perc");
      if (usage === 0) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(usage, 0, "KV cache usage back to 0 after the disconnect");
    assert.equal(await metric(server.baseUrl, "vllm:num_requests_running"), 0);
  });
});

describe("a --peft none server (no PEFT paths in the graph)", () => {
  let server: ServerHandle;

  before(async () => {
    server = await startRepoServer(["--peft", "none"]);
  });
  after(async () => {
    await server?.stop();
  });

  test("serves the base and soft-prompt tasks, and names --peft when a LoRA task is asked for", async () => {
    const chat = (task: string | null) =>
      fetch(`${server.baseUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", ...(task ? { "x-task": task } : {}) },
        body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], max_tokens: 4, temperature: 0 }),
      });
    assert.equal((await chat(null)).status, 200);
    assert.equal((await chat("ptune-mlp")).status, 200, "p-tuning needs no PEFT paths");
    const refused = await chat("lora-demo");
    assert.equal(refused.status, 422);
    const body = (await refused.json()) as { error: { type: string; message: string } };
    assert.equal(body.error.type, "adapter_incompatible");
    assert.match(body.error.message, /LORA adapters need the lora paths.*--peft none/);
  });
});
