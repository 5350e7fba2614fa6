import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import OpenAI from "openai";
import { TaskmuxError } from "../../src/errors.ts";
import { createApp } from "../../src/http/app.ts";
import { decodeIds, FAKE_MODEL_ID, FakeService, scriptToken, tokenLogprob } from "../helpers/fake-service.ts";
import { startServer, type TestServer } from "../helpers/server.ts";

const script = (seed: number | null, count: number) =>
  decodeIds(Array.from({ length: count }, (_, j) => scriptToken(seed, j)));

describe("the official openai client against a live server", () => {
  const service = new FakeService({ tasks: ["summarize"] });
  let server: TestServer;
  let client: OpenAI;
  let baseClient: OpenAI;

  before(async () => {
    server = await startServer(createApp({ service }));
    const common = { apiKey: "unused", baseURL: `${server.url}/v1`, maxRetries: 0, timeout: 5000 };
    client = new OpenAI({ ...common, defaultHeaders: { "X-Task": "summarize" } });
    baseClient = new OpenAI(common);
  });

  after(async () => {
    await server.close();
  });

  it("creates a completion for the task named in defaultHeaders", async () => {
    const completion = await client.completions.create({
      model: FAKE_MODEL_ID,
      prompt: "Hello",
      max_tokens: 3,
    });
    assert.equal(service.calls.at(-1)!.input.task, "summarize");
    assert.equal(completion.object, "text_completion");
    assert.equal(completion.choices[0]!.text, script(null, 3));
    assert.equal(completion.choices[0]!.finish_reason, "length");
    assert.deepEqual(completion.usage, { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 });
  });

  it("returns completion logprobs the client parses", async () => {
    const completion = await client.completions.create({
      model: FAKE_MODEL_ID,
      prompt: "Hello world",
      max_tokens: 2,
      logprobs: 1,
      echo: true,
    });
    const { logprobs, text } = completion.choices[0]!;
    assert.equal(text, "Hello world" + script(null, 2));
    assert.deepEqual(logprobs!.token_logprobs!.slice(2), [tokenLogprob(0), tokenLogprob(1)]);
    assert.equal(logprobs!.token_logprobs![0], null);
    assert.deepEqual(logprobs!.text_offset, [0, 5, 11, 15]);
  });

  it("streams a completion with usage", async () => {
    const stream = await client.completions.create({
      model: FAKE_MODEL_ID,
      prompt: "Hello",
      max_tokens: 4,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finishReason: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined | null;
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        text += choice.text;
        finishReason = choice.finish_reason ?? finishReason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(text, script(null, 4));
    assert.equal(finishReason, "length");
    assert.deepEqual(usage, { prompt_tokens: 1, completion_tokens: 4, total_tokens: 5 });
  });

  it("creates a chat completion with logprobs", async () => {
    const chat = await client.chat.completions.create({
      model: FAKE_MODEL_ID,
      messages: [{ role: "user", content: "Hi" }],
      max_completion_tokens: 2,
      logprobs: true,
      top_logprobs: 1,
      seed: 2,
    });
    assert.equal(service.calls.at(-1)!.input.task, "summarize");
    const choice = chat.choices[0]!;
    assert.equal(choice.message.role, "assistant");
    assert.equal(choice.message.content, script(2, 2));
    assert.equal(choice.finish_reason, "length");
    assert.equal(choice.logprobs!.content!.length, 2);
    assert.equal(choice.logprobs!.content![1]!.logprob, tokenLogprob(1));
    assert.equal(chat.usage!.completion_tokens, 2);
  });

  it("streams a chat completion on the base model", async () => {
    const stream = await baseClient.chat.completions.create({
      model: FAKE_MODEL_ID,
      messages: [{ role: "user", content: "Hi" }],
      max_tokens: 3,
      stream: true,
      stream_options: { include_usage: true },
    });
    let content = "";
    let role: string | undefined;
    let finishReason: string | null = null;
    let completionTokens = 0;
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        role ??= choice.delta.role;
        content += choice.delta.content ?? "";
        finishReason = choice.finish_reason ?? finishReason;
      }
      completionTokens = chunk.usage?.completion_tokens ?? completionTokens;
    }
    assert.equal(service.calls.at(-1)!.input.task, null);
    assert.equal(role, "assistant");
    assert.equal(content, script(null, 3));
    assert.equal(finishReason, "length");
    assert.equal(completionTokens, 3);
  });

  it("surfaces an unknown task as the client's NotFoundError", async () => {
    const other = new OpenAI({
      apiKey: "unused",
      baseURL: `${server.url}/v1`,
      maxRetries: 0,
      defaultHeaders: { "X-Task": "missing" },
    });
    await assert.rejects(
      other.completions.create({ model: FAKE_MODEL_ID, prompt: "x" }),
      (error: unknown) => {
        assert.ok(error instanceof OpenAI.NotFoundError);
        assert.equal(error.type, "task_not_found");
        assert.equal(error.code, "task_not_found");
        assert.equal(error.param, "X-Task");
        return true;
      },
    );
  });

  it("surfaces a mid-stream error frame as an APIError", async () => {
    const failing = new FakeService({
      failMidStream: { afterTokens: 1, error: new TaskmuxError("internal", "boom") },
    });
    const failingServer = await startServer(createApp({ service: failing }));
    try {
      const c = new OpenAI({ apiKey: "unused", baseURL: `${failingServer.url}/v1`, maxRetries: 0 });
      const stream = await c.completions.create({ model: FAKE_MODEL_ID, prompt: "x", stream: true });
      await assert.rejects(
        (async () => {
          for await (const _chunk of stream) {
            // drain
          }
        })(),
        (error: unknown) => error instanceof OpenAI.APIError && error.message.includes("boom"),
      );
    } finally {
      await failingServer.close();
    }
  });
});
