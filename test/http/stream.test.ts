import assert from "node:assert/strict";
import http from "node:http";
import { describe, it } from "node:test";
import { TaskmuxError } from "../../src/errors.ts";
import { createApp } from "../../src/http/app.ts";
import { decodeIds, FakeService, scriptToken } from "../helpers/fake-service.ts";
import { parseSse, postJson, startServer, withTimeout } from "../helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: SSE frames are checked field by field
type Json = any;

function setup(options: ConstructorParameters<typeof FakeService>[0] = {}) {
  const service = new FakeService({ tasks: ["summarize"], ...options });
  const app = createApp({ service });
  const stream = async (
    path: string,
    body: Record<string, unknown>,
    headers: Record<string, string> = {},
  ) => {
    const res = await postJson(app, path, { ...body, stream: true }, headers);
    const text = await res.text();
    return { res, text, frames: res.status === 200 ? (parseSse(text) as Json[]) : [] };
  };
  return { service, app, stream };
}

const script = (seed: number | null, count: number) =>
  decodeIds(Array.from({ length: count }, (_, j) => scriptToken(seed, j)));

describe("streaming", () => {
  it("streams completion chunks, a finish chunk and [DONE]", async () => {
    const { stream } = setup();
    const { res, text, frames } = await stream("/v1/completions", { prompt: "Hello", max_tokens: 3 });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("Content-Type")!, /^text\/event-stream/);
    assert.ok(text.split("\n\n").every((block) => block === "" || block.startsWith("data: ")));
    assert.equal(frames.at(-1), "[DONE]");
    const chunks = frames.slice(0, -1);
    assert.ok(
      chunks.every((c) => c.object === "text_completion" && c.id === chunks[0].id && !("usage" in c)),
    );
    assert.deepEqual(
      chunks.map((c) => c.choices[0].text),
      [...[0, 1, 2].map((j) => decodeIds([scriptToken(null, j)])), ""],
    );
    assert.deepEqual(
      chunks.map((c) => c.choices[0].finish_reason),
      [null, null, null, "length"],
    );
  });

  it("ends with a usage chunk when stream_options.include_usage is set", async () => {
    const { stream } = setup();
    const { frames } = await stream("/v1/completions", {
      prompt: "Hello",
      max_tokens: 2,
      n: 2,
      stream_options: { include_usage: true },
    });
    assert.equal(frames.at(-1), "[DONE]");
    const usage = frames.at(-2);
    assert.deepEqual(usage.choices, []);
    assert.deepEqual(usage.usage, { prompt_tokens: 1, completion_tokens: 4, total_tokens: 5 });
    assert.ok(frames.slice(0, -2).every((c: Json) => c.usage === null));
  });

  it("streams chat chunks starting with the assistant role", async () => {
    const { stream } = setup();
    const { frames } = await stream("/v1/chat/completions", {
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 2,
    });
    const chunks = frames.slice(0, -1);
    assert.ok(chunks.every((c) => c.object === "chat.completion.chunk"));
    assert.deepEqual(
      chunks.map((c) => [c.choices[0].delta, c.choices[0].finish_reason]),
      [
        [{ role: "assistant", content: "" }, null],
        [{ content: decodeIds([scriptToken(null, 0)]) }, null],
        [{ content: decodeIds([scriptToken(null, 1)]) }, null],
        [{}, "length"],
      ],
    );
    assert.equal(frames.at(-1), "[DONE]");
  });

  it("streams every choice of n with its own index, role and finish chunk", async () => {
    const { stream } = setup();
    const { frames } = await stream("/v1/chat/completions", {
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 2,
      n: 2,
      seed: 3,
    });
    for (const index of [0, 1]) {
      const mine = frames.slice(0, -1).filter((c: Json) => c.choices[0].index === index);
      assert.deepEqual(mine[0].choices[0].delta, { role: "assistant", content: "" });
      assert.equal(mine.map((c: Json) => c.choices[0].delta.content ?? "").join(""), script(3 + index, 2));
      assert.equal(mine.at(-1).choices[0].finish_reason, "length");
    }
  });

  it("sends the echoed prompt and its logprobs first, with offsets over the whole text", async () => {
    const { stream } = setup();
    const { frames } = await stream("/v1/completions", {
      prompt: "Hello world",
      max_tokens: 2,
      echo: true,
      logprobs: 1,
    });
    const chunks = frames.slice(0, -1);
    assert.equal(chunks[0].choices[0].text, "Hello world");
    assert.deepEqual(chunks[0].choices[0].logprobs.token_logprobs[0], null);
    assert.deepEqual(chunks[0].choices[0].logprobs.text_offset, [0, 5]);
    assert.deepEqual(chunks[1].choices[0].logprobs.text_offset, [11]);
    assert.deepEqual(chunks[2].choices[0].logprobs.text_offset, [
      11 + decodeIds([scriptToken(null, 0)]).length,
    ]);
    assert.equal(chunks.map((c) => c.choices[0].text).join(""), "Hello world" + script(null, 2));
  });

  it("sends one error frame and closes when generation fails mid-stream", async () => {
    const failure = new TaskmuxError("internal", "model step failed: boom");
    const { service, stream } = setup({
      tokenDelayMs: 2,
      failMidStream: { afterTokens: 2, error: failure, calls: [0] },
    });
    const { res, text, frames } = await stream("/v1/completions", { prompt: "Hello", max_tokens: 50, n: 2 });
    assert.equal(res.status, 200);
    assert.ok(!text.includes("event:"));
    assert.ok(!frames.includes("[DONE]"));
    assert.deepEqual(frames.at(-1), {
      error: { message: "model step failed: boom", type: "internal", param: null, code: "internal" },
    });
    assert.equal(service.calls[1]!.signal!.aborted, true);
  });

  it("answers a failure before the first chunk with an ordinary error response", async () => {
    const { res } = await setup({
      failStart: () => new TaskmuxError("overloaded", "queue full"),
    }).stream("/v1/completions", { prompt: "Hello" });
    assert.equal(res.status, 429);
    assert.equal(res.headers.get("Retry-After"), "1");
    assert.match(res.headers.get("Content-Type")!, /application\/json/);
  });

  it("delivers chunks over a real socket before the generation ends", async () => {
    const { app } = setup({ tokenDelayMs: 30 });
    const server = await startServer(app);
    try {
      const res = await fetch(`${server.url}/v1/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt: "Hello", max_tokens: 5, stream: true }),
      });
      const reader = res.body!.getReader();
      const started = Date.now();
      const first = await withTimeout(reader.read(), 2000, "first SSE chunk");
      assert.ok(Date.now() - started < 5 * 30, "the first chunk came before all tokens were generated");
      assert.match(new TextDecoder().decode(first.value), /^data: \{/);
      let rest = "";
      for (;;) {
        const { done, value } = await withTimeout(reader.read(), 2000, "next SSE chunk");
        if (done) break;
        rest += new TextDecoder().decode(value);
      }
      assert.ok(rest.endsWith("data: [DONE]\n\n"));
    } finally {
      await server.close();
    }
  });

  it("aborts the service's signal when a streaming client disconnects", async () => {
    const { service, app } = setup({ tokenDelayMs: 20 });
    const server = await startServer(app);
    try {
      const body = JSON.stringify({ prompt: "Hello", max_tokens: 10_000, stream: true });
      const req = http.request(`${server.url}/v1/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) },
      });
      const firstData = new Promise<void>((resolve, reject) => {
        req.on("response", (res) => res.once("data", () => resolve()));
        req.on("error", reject);
      });
      req.end(body);
      await withTimeout(firstData, 2000, "first streamed bytes");
      assert.equal(service.calls[0]!.signal!.aborted, false);
      req.on("error", () => {});
      req.destroy();
      await service.waitForAbort(0, 2000);
    } finally {
      await server.close();
    }
  });

  it("aborts the service's signal when a non-streaming client disconnects", async () => {
    const { service, app } = setup({ tokenDelayMs: 20 });
    const server = await startServer(app);
    try {
      const controller = new AbortController();
      const pending = fetch(`${server.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], max_tokens: 10_000 }),
        signal: controller.signal,
      }).catch(() => undefined);
      await service.waitForCall(0, 2000);
      controller.abort();
      await pending;
      await service.waitForAbort(0, 2000);
    } finally {
      await server.close();
    }
  });
});
