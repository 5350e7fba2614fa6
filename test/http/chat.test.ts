import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { createApp } from "../../src/http/app.ts";
import {
  decodeIds,
  FAKE_MODEL_ID,
  FakeService,
  rawTokenText,
  scriptToken,
  tokenLogprob,
} from "../helpers/fake-service.ts";
import { postJson } from "../helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field
type Json = any;

function setup(options: ConstructorParameters<typeof FakeService>[0] = {}) {
  const service = new FakeService({ tasks: ["summarize", "classify"], ...options });
  const app = createApp({ service });
  const chat = async (body: unknown, headers: Record<string, string> = {}) => {
    const res = await postJson(app, "/v1/chat/completions", body, headers);
    return { res, body: (await res.json()) as Json };
  };
  return { service, chat };
}

const script = (seed: number | null, count: number) =>
  decodeIds(Array.from({ length: count }, (_, j) => scriptToken(seed, j)));
const user = (content: unknown) => [{ role: "user", content }];

describe("POST /v1/chat/completions", () => {
  it("answers in OpenAI's chat.completion shape", async () => {
    const { chat } = setup();
    const { res, body } = await chat({ messages: user("Hello"), max_tokens: 3 });
    assert.equal(res.status, 200);
    assert.match(body.id, /^chatcmpl-[0-9a-f]{24}$/);
    assert.equal(body.object, "chat.completion");
    assert.equal(body.model, FAKE_MODEL_ID);
    assert.ok(Number.isInteger(body.created));
    assert.deepEqual(body.choices, [
      {
        index: 0,
        message: { role: "assistant", content: script(null, 3) },
        logprobs: null,
        finish_reason: "length",
      },
    ]);
    assert.equal(body.usage.completion_tokens, 3);
    assert.equal(body.usage.total_tokens, body.usage.prompt_tokens + 3);
  });

  it("sends the messages to the service as a chat prompt", async () => {
    const { service, chat } = setup();
    const messages = [
      { role: "system", content: "Be brief." },
      { role: "user", content: "Hello" },
    ];
    await chat({ messages, max_tokens: 1 });
    assert.deepEqual(service.calls[0]!.input.prompt, { kind: "chat", messages });
  });

  it("joins text content parts with newlines and reads null content as empty", async () => {
    const { service, chat } = setup();
    const parts = [
      { type: "text", text: "first" },
      { type: "text", text: "second" },
    ];
    await chat({ messages: [...user(parts), { role: "assistant", content: null }], max_tokens: 1 });
    assert.deepEqual(service.calls[0]!.input.prompt, {
      kind: "chat",
      messages: [
        { role: "user", content: "first\nsecond" },
        { role: "assistant", content: "" },
      ],
    });
  });

  it("prefers max_completion_tokens over max_tokens and leaves the limit to the service when neither is set", async () => {
    const { service, chat } = setup();
    await chat({ messages: user("Hi"), max_tokens: 5, max_completion_tokens: 2 });
    await chat({ messages: user("Hi"), max_tokens: 4 });
    await chat({ messages: user("Hi") });
    assert.deepEqual(
      service.calls.map((c) => c.input.params.maxTokens),
      [2, 4, undefined],
    );
  });

  it("forwards sampling fields, ignore_eos and template fields", async () => {
    const { service, chat } = setup();
    await chat({
      messages: user("Hi"),
      max_tokens: 1,
      temperature: 0,
      top_p: 0.5,
      top_k: 3,
      seed: 9,
      stop: ["a", "b"],
      ignore_eos: false,
      taskmux: { fields: { lang: "fr" } },
      tools: [],
    });
    const { input } = service.calls[0]!;
    assert.deepEqual(input.params, {
      maxTokens: 1,
      temperature: 0,
      topP: 0.5,
      topK: 3,
      seed: 9,
      stop: ["a", "b"],
      ignoreEos: false,
    });
    assert.deepEqual(input.fields, { lang: "fr" });
  });

  it("returns chat logprobs with bytes and top_logprobs", async () => {
    const { service, chat } = setup();
    const { body } = await chat({ messages: user("Hi"), max_tokens: 2, logprobs: true, top_logprobs: 2 });
    assert.equal(service.calls[0]!.input.params.logprobs, 2);
    const entries = body.choices[0].logprobs.content;
    assert.equal(entries.length, 2);
    const id = scriptToken(null, 0);
    const bytes = (s: string) => Array.from(Buffer.from(s, "utf8"));
    assert.deepEqual(entries[0], {
      token: rawTokenText(id),
      logprob: tokenLogprob(0),
      bytes: bytes(decodeIds([id])),
      top_logprobs: [
        { token: rawTokenText(id), logprob: tokenLogprob(0), bytes: bytes(decodeIds([id])) },
        { token: "Ġdog", logprob: tokenLogprob(0) - 1, bytes: bytes(" dog") },
      ],
    });
  });

  it("asks for no top logprobs when logprobs is true without top_logprobs", async () => {
    const { service, chat } = setup();
    const { body } = await chat({ messages: user("Hi"), max_tokens: 1, logprobs: true });
    assert.equal(service.calls[0]!.input.params.logprobs, 0);
    assert.deepEqual(body.choices[0].logprobs.content[0].top_logprobs, []);
  });

  it("returns null logprobs when logprobs is false", async () => {
    const { service, chat } = setup();
    const { body } = await chat({ messages: user("Hi"), max_tokens: 1, logprobs: false });
    assert.equal(service.calls[0]!.input.params.logprobs, undefined);
    assert.equal(body.choices[0].logprobs, null);
  });

  it("rejects top_logprobs without logprobs", async () => {
    const { service, chat } = setup();
    const { res, body } = await chat({ messages: user("Hi"), top_logprobs: 3 });
    assert.equal(res.status, 400);
    assert.equal(body.error.param, "top_logprobs");
    assert.equal(service.calls.length, 0);
  });

  it("generates n choices with seeds seed + i", async () => {
    const { service, chat } = setup();
    const { body } = await chat({ messages: user("Hi"), n: 3, seed: 1, max_tokens: 2 });
    assert.deepEqual(
      service.calls.map((c) => c.input.params.seed),
      [1, 2, 3],
    );
    assert.deepEqual(
      body.choices.map((c: Json) => [c.index, c.message.content]),
      [
        [0, script(1, 2)],
        [1, script(2, 2)],
        [2, script(3, 2)],
      ],
    );
    assert.equal(body.usage.completion_tokens, 6);
    assert.equal(body.usage.prompt_tokens, service.calls[0]!.promptTokens.length);
  });

  it("stops at a stop string", async () => {
    const { chat } = setup();
    const { body } = await chat({ messages: user("Hi"), stop: " sat", max_tokens: 10 });
    assert.equal(body.choices[0].message.content, " the cat");
    assert.equal(body.choices[0].finish_reason, "stop");
  });

  it("selects a task by X-Task or by model", async () => {
    const { service, chat } = setup();
    await chat({ messages: user("Hi"), max_tokens: 1 }, { "X-Task": "summarize" });
    await chat({ messages: user("Hi"), max_tokens: 1, model: "classify" });
    assert.deepEqual(
      service.calls.map((c) => c.input.task),
      ["summarize", "classify"],
    );
  });
});
