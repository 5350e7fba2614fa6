import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { TaskmuxError } from "../../src/errors.ts";
import { createApp } from "../../src/http/app.ts";
import {
  decodeIds,
  encode,
  FAKE_MODEL_ID,
  FakeService,
  promptTokenLogprob,
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
  const complete = async (body: unknown, headers: Record<string, string> = {}) => {
    const res = await postJson(app, "/v1/completions", body, headers);
    return { res, body: (await res.json()) as Json };
  };
  return { service, app, complete };
}

/** The text the fake generates for a seed and a token count. */
const script = (seed: number | null, count: number) =>
  decodeIds(Array.from({ length: count }, (_, j) => scriptToken(seed, j)));

describe("POST /v1/completions", () => {
  it("answers a string prompt in OpenAI's text_completion shape", async () => {
    const { complete } = setup();
    const { res, body } = await complete({ prompt: "Hello", max_tokens: 3 });
    assert.equal(res.status, 200);
    assert.match(body.id, /^cmpl-[0-9a-f]{24}$/);
    assert.equal(body.object, "text_completion");
    assert.ok(Number.isInteger(body.created) && Math.abs(body.created - Date.now() / 1000) < 5);
    assert.equal(body.model, FAKE_MODEL_ID);
    assert.equal(body.system_fingerprint, null);
    assert.deepEqual(body.choices, [
      { index: 0, text: script(null, 3), logprobs: null, finish_reason: "length" },
    ]);
    assert.deepEqual(body.usage, { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 });
  });

  it("defaults max_tokens to 16 as OpenAI does", async () => {
    const { service, complete } = setup();
    const { body } = await complete({ prompt: "Hello" });
    assert.equal(service.calls[0]!.input.params.maxTokens, 16);
    assert.equal(body.usage.completion_tokens, 16);
  });

  it("accepts max_tokens 0 and returns an empty completion", async () => {
    const { complete } = setup();
    const { body } = await complete({ prompt: "Hello", max_tokens: 0 });
    assert.equal(body.choices[0].text, "");
    assert.equal(body.choices[0].finish_reason, "length");
  });

  it("forwards the sampling fields it was given, and only those", async () => {
    const { service, complete } = setup();
    await complete({
      prompt: "Hello",
      max_tokens: 2,
      temperature: 0.7,
      top_p: 0.9,
      top_k: 40,
      seed: 11,
      stop: "\n",
      ignore_eos: true,
      user: "someone",
      presence_penalty: 0.5,
      taskmux: { fields: { name: "Ada" } },
    });
    const { input } = service.calls[0]!;
    assert.deepEqual(input.params, {
      maxTokens: 2,
      temperature: 0.7,
      topP: 0.9,
      topK: 40,
      seed: 11,
      stop: ["\n"],
      ignoreEos: true,
    });
    assert.deepEqual(input.fields, { name: "Ada" });
    assert.deepEqual(input.prompt, { kind: "text", text: "Hello" });
    assert.equal(input.task, null);
  });

  it("treats null optional fields as unset", async () => {
    const { service, complete } = setup();
    const { res } = await complete({ prompt: "Hello", temperature: null, stop: null, seed: null, n: null });
    assert.equal(res.status, 200);
    assert.deepEqual(service.calls[0]!.input.params, { maxTokens: 16 });
  });

  it("treats each string of a prompt array as its own prompt", async () => {
    const { service, complete } = setup();
    const { body } = await complete({ prompt: ["Hello", " the cat"], max_tokens: 1 });
    assert.deepEqual(
      service.calls.map((c) => c.input.prompt),
      [
        { kind: "text", text: "Hello" },
        { kind: "text", text: " the cat" },
      ],
    );
    assert.deepEqual(
      body.choices.map((c: Json) => c.index),
      [0, 1],
    );
    assert.equal(body.usage.prompt_tokens, 1 + 2);
  });

  it("treats a token array as one prompt and an array of token arrays as many", async () => {
    const { service, complete } = setup();
    await complete({ prompt: [8, 9], max_tokens: 1 });
    assert.deepEqual(service.calls[0]!.input.prompt, { kind: "tokens", tokens: [8, 9] });
    await complete({ prompt: [[8], [1, 2]], max_tokens: 1 });
    assert.deepEqual(
      service.calls.slice(1).map((c) => c.input.prompt),
      [
        { kind: "tokens", tokens: [8] },
        { kind: "tokens", tokens: [1, 2] },
      ],
    );
  });

  it("numbers n choices per prompt like OpenAI and counts each prompt's tokens once", async () => {
    const { service, complete } = setup();
    const { body } = await complete({ prompt: ["Hello", " the cat"], n: 2, max_tokens: 2, seed: 5 });
    assert.equal(body.choices.length, 4);
    assert.deepEqual(
      service.calls.map((c) => [c.input.prompt, c.input.params.seed]),
      [
        [{ kind: "text", text: "Hello" }, 5],
        [{ kind: "text", text: "Hello" }, 6],
        [{ kind: "text", text: " the cat" }, 5],
        [{ kind: "text", text: " the cat" }, 6],
      ],
    );
    assert.deepEqual(
      body.choices.map((c: Json) => [c.index, c.text]),
      [
        [0, script(5, 2)],
        [1, script(6, 2)],
        [2, script(5, 2)],
        [3, script(6, 2)],
      ],
    );
    assert.deepEqual(body.usage, { prompt_tokens: 3, completion_tokens: 8, total_tokens: 11 });
  });

  it("is reproducible for n choices with a fixed seed", async () => {
    const { complete } = setup();
    const request = { prompt: "Hello", n: 3, max_tokens: 4, seed: 42 };
    const first = (await complete(request)).body.choices.map((c: Json) => c.text);
    const second = (await complete(request)).body.choices.map((c: Json) => c.text);
    assert.deepEqual(first, second);
    assert.equal(new Set(first).size, 3);
  });

  it("runs the n choices concurrently under one AbortSignal", async () => {
    const { service, complete } = setup({ tokenDelayMs: 5 });
    await complete({ prompt: "Hello", n: 3, max_tokens: 2 });
    const signals = new Set(service.calls.map((c) => c.signal));
    assert.equal(signals.size, 1);
    assert.equal([...signals][0]!.aborted, false);
  });

  it("stops at a stop string and reports finish_reason stop", async () => {
    const { complete } = setup();
    const { body } = await complete({ prompt: "Hello", max_tokens: 10, stop: [" on", "zzz"] });
    assert.equal(body.choices[0].text, " the cat sat");
    assert.equal(body.choices[0].finish_reason, "stop");
  });

  it("honours ignore_eos", async () => {
    const { complete } = setup({ eosAfter: 2 });
    const eos = (await complete({ prompt: "Hello", max_tokens: 5 })).body;
    assert.equal(eos.choices[0].finish_reason, "stop");
    assert.equal(eos.usage.completion_tokens, 3);
    const ignored = (await complete({ prompt: "Hello", max_tokens: 5, ignore_eos: true })).body;
    assert.equal(ignored.choices[0].finish_reason, "length");
    assert.equal(ignored.usage.completion_tokens, 5);
  });

  it("echoes the prompt before the completion", async () => {
    const { complete } = setup();
    const text = (await complete({ prompt: "Hello world", max_tokens: 2, echo: true })).body.choices[0].text;
    assert.equal(text, "Hello world" + script(null, 2));
    const tokens = (await complete({ prompt: [8, 9], max_tokens: 1, echo: true })).body.choices[0].text;
    assert.equal(tokens, "Hello world" + script(null, 1));
  });

  it("returns legacy logprobs with token strings, top dicts and text offsets", async () => {
    const { service, complete } = setup();
    const { body } = await complete({ prompt: "Hello", max_tokens: 3, logprobs: 2 });
    assert.equal(service.calls[0]!.input.params.logprobs, 2);
    assert.equal(service.calls[0]!.input.params.promptLogprobs, undefined);
    const ids = [0, 1, 2].map((j) => scriptToken(null, j));
    assert.deepEqual(body.choices[0].logprobs, {
      tokens: ids.map(rawTokenText),
      token_logprobs: [0, 1, 2].map(tokenLogprob),
      top_logprobs: ids.map((id, j) => ({ [rawTokenText(id)]: tokenLogprob(j), Ġdog: tokenLogprob(j) - 1 })),
      text_offset: [0, 4, 8],
    });
  });

  it("scores the prompt with echo, logprobs and max_tokens 0 (lm-evaluation-harness)", async () => {
    const { service, complete } = setup();
    const prompt = [8, 9, 1, 2];
    const { body } = await complete({
      prompt: [prompt],
      max_tokens: 0,
      logprobs: 1,
      echo: true,
      temperature: 0,
    });
    assert.equal(service.calls[0]!.input.params.promptLogprobs, 1);
    const choice = body.choices[0];
    assert.equal(choice.text, "Hello world the cat");
    assert.deepEqual(choice.logprobs.tokens, ["Hello", "Ġworld", "Ġthe", "Ġcat"]);
    assert.deepEqual(choice.logprobs.token_logprobs, [
      null,
      promptTokenLogprob(1),
      promptTokenLogprob(2),
      promptTokenLogprob(3),
    ]);
    assert.equal(choice.logprobs.top_logprobs[0], null);
    assert.deepEqual(choice.logprobs.top_logprobs[2], { Ġthe: promptTokenLogprob(2) });
    assert.deepEqual(choice.logprobs.text_offset, [0, 5, 11, 15]);
    assert.deepEqual(body.usage, { prompt_tokens: 4, completion_tokens: 0, total_tokens: 4 });
  });

  it("puts completion offsets after the echoed prompt", async () => {
    const { complete } = setup();
    const { body } = await complete({ prompt: "Hello world", max_tokens: 2, logprobs: 0, echo: true });
    const lp = body.choices[0].logprobs;
    assert.equal(lp.tokens.length, 4);
    assert.deepEqual(lp.text_offset, [0, 5, 11, 15]);
    assert.deepEqual(lp.top_logprobs.slice(2), [{}, {}]);
    for (const [i, offset] of lp.text_offset.entries()) {
      const piece = decodeIds(i < 2 ? encode("Hello world").slice(i, i + 1) : [scriptToken(null, i - 2)]);
      assert.equal(body.choices[0].text.slice(offset, offset + piece.length), piece);
    }
  });

  it("runs the task named by X-Task and echoes the request's model", async () => {
    const { service, complete } = setup();
    const ok = await complete(
      { prompt: "Hello", max_tokens: 1, model: FAKE_MODEL_ID },
      { "X-Task": "summarize" },
    );
    assert.equal(ok.res.status, 200);
    assert.equal(service.calls.at(-1)!.input.task, "summarize");
    assert.equal(ok.body.model, FAKE_MODEL_ID);
  });

  it("runs a task named by model (vLLM's convention)", async () => {
    const { service, complete } = setup();
    const { body } = await complete({ prompt: "Hello", max_tokens: 1, model: "classify" });
    assert.equal(service.calls[0]!.input.task, "classify");
    assert.equal(body.model, "classify");
  });

  it("runs the base model for model 'default' or no model", async () => {
    const { service, complete } = setup();
    await complete({ prompt: "Hello", max_tokens: 1, model: "default" });
    await complete({ prompt: "Hello", max_tokens: 1 });
    assert.deepEqual(
      service.calls.map((c) => c.input.task),
      [null, null],
    );
  });

  it("passes the X-Request-Id to the service and echoes it", async () => {
    const { service, complete } = setup();
    const { res } = await complete({ prompt: "Hello", max_tokens: 1 }, { "X-Request-Id": "req-123" });
    assert.equal(res.headers.get("X-Request-Id"), "req-123");
    assert.equal(service.calls[0]!.input.requestId, "req-123");
  });

  it("cancels the started siblings when one choice fails to start", async () => {
    const overloaded = new TaskmuxError("overloaded", "queue full", { retryAfterSeconds: 3 });
    const { service, complete } = setup({
      failStart: (_input, call) => (call === 1 ? overloaded : undefined),
    });
    const { res, body } = await complete({ prompt: "Hello", n: 3, max_tokens: 2 });
    assert.equal(res.status, 429);
    assert.equal(res.headers.get("Retry-After"), "3");
    assert.equal(body.error.type, "overloaded");
    assert.equal(service.calls[0]!.signal!.aborted, true);
  });

  it("fails the request and cancels the siblings when one choice fails mid-generation", async () => {
    const failure = new TaskmuxError("internal", "model step failed: boom");
    const { service, complete } = setup({
      tokenDelayMs: 2,
      failMidStream: { afterTokens: 1, error: failure, calls: [0] },
    });
    const { res, body } = await complete({ prompt: "Hello", n: 2, max_tokens: 50 });
    assert.equal(res.status, 500);
    assert.deepEqual(body.error, {
      message: "model step failed: boom",
      type: "internal",
      param: null,
      code: "internal",
    });
    assert.equal(service.calls[1]!.signal!.aborted, true);
  });
});
