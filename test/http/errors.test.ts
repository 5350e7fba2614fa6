import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { TaskmuxError, type TaskmuxErrorType } from "../../src/errors.ts";
import { createApp } from "../../src/http/app.ts";
import { FAKE_MODEL_ID, FakeService } from "../helpers/fake-service.ts";
import { postJson } from "../helpers/server.ts";

// biome-ignore lint/suspicious/noExplicitAny: response bodies are checked field by field
type Json = any;

function setup(options: ConstructorParameters<typeof FakeService>[0] = {}, appOptions = {}) {
  const service = new FakeService({ tasks: ["summarize", "classify"], ...options });
  const app = createApp({ service, ...appOptions });
  const post = async (path: string, body: unknown, headers: Record<string, string> = {}) => {
    const res = await postJson(app, path, body, headers);
    return { res, body: (await res.json()) as Json };
  };
  return { service, app, post };
}

function assertErrorShape(body: Json): void {
  assert.deepEqual(Object.keys(body), ["error"]);
  assert.deepEqual(Object.keys(body.error).sort(), ["code", "message", "param", "type"]);
  assert.equal(typeof body.error.message, "string");
}

describe("error mapping", () => {
  const table: [TaskmuxErrorType, number, string | null][] = [
    ["invalid_request", 400, null],
    ["task_not_found", 404, null],
    ["model_not_found", 404, null],
    ["adapter_incompatible", 422, null],
    ["adapter_load_failed", 422, null],
    ["payload_too_large", 413, null],
    ["overloaded", 429, "1"],
    ["shutting_down", 503, "5"],
    ["unsupported_model", 500, null],
    ["internal", 500, null],
  ];
  for (const [type, status, retryAfter] of table) {
    it(`maps a service ${type} error to ${status}`, async () => {
      const error = new TaskmuxError(type, `failed with ${type}`, { param: "prompt" });
      const { post } = setup({ failStart: () => error });
      const { res, body } = await post("/v1/completions", { prompt: "Hello" });
      assert.equal(res.status, status);
      assertErrorShape(body);
      assert.deepEqual(body.error, { message: `failed with ${type}`, type, param: "prompt", code: type });
      assert.equal(res.headers.get("Retry-After"), retryAfter);
    });
  }

  it("uses the error's own retryAfterSeconds for Retry-After", async () => {
    const error = new TaskmuxError("shutting_down", "draining", { retryAfterSeconds: 30 });
    const { post } = setup({ failStart: () => error });
    const { res } = await post("/v1/chat/completions", { messages: [{ role: "user", content: "Hi" }] });
    assert.equal(res.status, 503);
    assert.equal(res.headers.get("Retry-After"), "30");
  });

  it("answers an unknown error with a generic 500 that leaks no stack", async () => {
    const { service, post } = setup();
    service.generate = async () => {
      throw new Error("secret detail at /srv/app.ts:12");
    };
    const { res, body } = await post("/v1/completions", { prompt: "Hello" });
    assert.equal(res.status, 500);
    assert.deepEqual(body.error, {
      message: "internal server error",
      type: "internal",
      param: null,
      code: "internal",
    });
    assert.ok(!JSON.stringify(body).includes("secret"));
  });

  it("answers invalid JSON and an empty body with 400", async () => {
    const { post } = setup();
    for (const raw of ["{not json", ""]) {
      const { res, body } = await post("/v1/completions", raw);
      assert.equal(res.status, 400);
      assertErrorShape(body);
      assert.equal(body.error.code, "invalid_json");
    }
  });

  it("answers a body that is not an object with 400", async () => {
    const { post } = setup();
    const { res, body } = await post("/v1/completions", [1, 2]);
    assert.equal(res.status, 400);
    assert.equal(body.error.param, null);
    assert.match(body.error.message, /object/);
  });

  it("answers bodies over the limit with 413, with or without Content-Length", async () => {
    const { app, service } = setup({}, { bodyLimitBytes: 100 });
    const big = JSON.stringify({ prompt: "x".repeat(200) });
    const sized = await postJson(app, "/v1/completions", big);
    assert.equal(sized.status, 413);
    assert.equal(((await sized.json()) as Json).error.type, "payload_too_large");
    const chunked = await app.request("/v1/completions", {
      method: "POST",
      body: new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode(big));
          controller.close();
        },
      }),
      headers: { "Content-Type": "application/json" },
      duplex: "half",
    } as RequestInit);
    assert.equal(chunked.status, 413);
    assert.equal(service.calls.length, 0);
  });

  it("reads a body without Content-Length that is under the limit", async () => {
    const { app } = setup({}, { bodyLimitBytes: 100 });
    const res = await app.request("/v1/completions", {
      method: "POST",
      body: new ReadableStream({
        start(controller) {
          controller.enqueue(new TextEncoder().encode('{"prompt": "Hello",'));
          controller.enqueue(new TextEncoder().encode(' "max_tokens": 1}'));
          controller.close();
        },
      }),
      headers: { "Content-Type": "application/json" },
      duplex: "half",
    } as RequestInit);
    assert.equal(res.status, 200);
  });

  it("accepts bodies up to the default 1 MiB limit", async () => {
    const { post } = setup();
    const { res } = await post("/v1/completions", { prompt: "x".repeat(900 * 1024), max_tokens: 1 });
    assert.equal(res.status, 200);
  });

  it("answers unknown routes with 404 and wrong methods with 405 in the same shape", async () => {
    const { app } = setup();
    const missing = await app.request("/v1/nothing");
    assert.equal(missing.status, 404);
    assertErrorShape(await missing.json());
    const wrong = await app.request("/v1/chat/completions");
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get("Allow"), "POST");
    const body = (await wrong.json()) as Json;
    assertErrorShape(body);
    assert.equal(body.error.code, "method_not_allowed");
    const deleteModels = await app.request("/v1/models", { method: "DELETE" });
    assert.equal(deleteModels.status, 405);
    assert.equal(deleteModels.headers.get("Allow"), "GET");
  });

  it("echoes a valid X-Request-Id and generates one otherwise, on errors too", async () => {
    const { app } = setup();
    const echoed = await app.request("/v1/nothing", { headers: { "X-Request-Id": "abc-123" } });
    assert.equal(echoed.headers.get("X-Request-Id"), "abc-123");
    const generated = await app.request("/v1/nothing", { headers: { "X-Request-Id": "bad id!" } });
    assert.match(generated.headers.get("X-Request-Id")!, /^[0-9a-f-]{36}$/);
  });
});

describe("validation", () => {
  const complete: [string, Record<string, unknown>, string, RegExp][] = [
    ["a missing prompt", {}, "prompt", /required/],
    ["a prompt of the wrong shape", { prompt: { text: "x" } }, "prompt", /string, an array of strings/],
    ["a mixed prompt array", { prompt: ["a", 1] }, "prompt", /array of token ids/],
    [
      "a negative token id",
      {
        prompt: [
          [1, 2],
          [3, -1],
        ],
      },
      "prompt[1][1]",
      />= 0/,
    ],
    ["a negative temperature", { prompt: "x", temperature: -0.1 }, "temperature", />= 0/],
    ["a temperature above 2", { prompt: "x", temperature: 2.5 }, "temperature", /<= 2/],
    [
      "a string temperature",
      { prompt: "x", temperature: "hot" },
      "temperature",
      /number \(received string\)/,
    ],
    ["top_p 0", { prompt: "x", top_p: 0 }, "top_p", /> 0/],
    ["top_p above 1", { prompt: "x", top_p: 1.5 }, "top_p", /<= 1/],
    ["a negative top_k", { prompt: "x", top_k: -1 }, "top_k", />= 0/],
    ["a fractional top_k", { prompt: "x", top_k: 1.5 }, "top_k", /integer/],
    ["n 0", { prompt: "x", n: 0 }, "n", />= 1/],
    ["n above maxN", { prompt: "x", n: 17 }, "n", /<= 16/],
    ["a negative max_tokens", { prompt: "x", max_tokens: -1 }, "max_tokens", />= 0/],
    ["logprobs 6", { prompt: "x", logprobs: 6 }, "logprobs", /<= 5/],
    ["five stop strings", { prompt: "x", stop: ["a", "b", "c", "d", "e"] }, "stop", /at most 4/],
    ["an empty stop string", { prompt: "x", stop: ["a", ""] }, "stop[1]", /at least 1/],
    ["a fractional seed", { prompt: "x", seed: 1.5 }, "seed", /integer/],
    ["an unsafe seed", { prompt: "x", seed: 2 ** 60 }, "seed", /<= 9007199254740991/],
    ["a non-boolean echo", { prompt: "x", echo: "yes" }, "echo", /boolean/],
    [
      "non-string template fields",
      { prompt: "x", taskmux: { fields: { a: 1 } } },
      "taskmux.fields.a",
      /string/,
    ],
  ];
  for (const [what, body, param, message] of complete) {
    it(`rejects ${what} on /v1/completions naming ${param}`, async () => {
      const { post, service } = setup();
      const { res, body: error } = await post("/v1/completions", body);
      assert.equal(res.status, 400);
      assert.equal(error.error.type, "invalid_request");
      assert.equal(error.error.param, param);
      assert.match(error.error.message, message);
      assert.ok(error.error.message.startsWith(param));
      assert.equal(service.calls.length, 0);
    });
  }

  const chat: [string, Record<string, unknown>, string, RegExp][] = [
    ["missing messages", {}, "messages", /required/],
    ["empty messages", { messages: [] }, "messages", /at least 1/],
    [
      "a numeric content",
      { messages: [{ role: "user", content: 5 }] },
      "messages[0].content",
      /string, an array/,
    ],
    [
      "an image part",
      { messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }] },
      "messages[0].content[0].type",
      /"text"/,
    ],
    ["an empty role", { messages: [{ role: "", content: "x" }] }, "messages[0].role", /at least 1/],
    [
      "top_logprobs 21",
      { messages: [{ role: "user", content: "x" }], logprobs: true, top_logprobs: 21 },
      "top_logprobs",
      /<= 20/,
    ],
    [
      "a non-boolean logprobs",
      { messages: [{ role: "user", content: "x" }], logprobs: 2 },
      "logprobs",
      /boolean/,
    ],
    [
      "a negative max_completion_tokens",
      { messages: [{ role: "user", content: "x" }], max_completion_tokens: -2 },
      "max_completion_tokens",
      />= 0/,
    ],
  ];
  for (const [what, body, param, message] of chat) {
    it(`rejects ${what} on /v1/chat/completions naming ${param}`, async () => {
      const { post, service } = setup();
      const { res, body: error } = await post("/v1/chat/completions", body);
      assert.equal(res.status, 400);
      assert.equal(error.error.param, param);
      assert.match(error.error.message, message);
      assert.equal(service.calls.length, 0);
    });
  }

  it("takes maxN from the app options", async () => {
    const { post } = setup({}, { maxN: 2 });
    assert.equal((await post("/v1/completions", { prompt: "x", n: 2, max_tokens: 1 })).res.status, 200);
    const { res, body } = await post("/v1/completions", { prompt: "x", n: 3, max_tokens: 1 });
    assert.equal(res.status, 400);
    assert.equal(body.error.param, "n");
    assert.match(body.error.message, /<= 2/);
  });

  it("accepts temperature 0 and 2, top_p 1, top_k 0, logprobs 5 and top_logprobs 20", async () => {
    const { post } = setup();
    for (const temperature of [0, 2]) {
      const { res } = await post("/v1/completions", {
        prompt: "x",
        max_tokens: 1,
        temperature,
        top_p: 1,
        top_k: 0,
        logprobs: 5,
      });
      assert.equal(res.status, 200);
    }
    const { res } = await post("/v1/chat/completions", {
      messages: [{ role: "user", content: "x" }],
      max_tokens: 1,
      logprobs: true,
      top_logprobs: 20,
    });
    assert.equal(res.status, 200);
  });
});

describe("task selection errors", () => {
  const badNames = ["../etc", "a/b", ".", "..", "x".repeat(65), "sp ace", "naïve", ""];
  for (const name of badNames) {
    it(`rejects X-Task ${JSON.stringify(name.length > 20 ? `${name.slice(0, 8)}…` : name)} with 400 before the service`, async () => {
      const { post, service } = setup();
      const { res, body } = await post("/v1/completions", { prompt: "x" }, { "X-Task": name });
      assert.equal(res.status, 400);
      assert.equal(body.error.param, "X-Task");
      assert.equal(service.calls.length, 0);
      assert.deepEqual(service.hasTaskCalls, []);
    });
  }

  it("accepts a 64-character name made of every allowed character class", async () => {
    const name = `Aa0._-${"x".repeat(58)}`;
    const { post, service } = setup({ tasks: [name] });
    const { res } = await post("/v1/completions", { prompt: "x", max_tokens: 1 }, { "X-Task": name });
    assert.equal(res.status, 200);
    assert.equal(service.calls[0]!.input.task, name);
  });

  it("answers an unknown X-Task with 404 task_not_found", async () => {
    const { post, service } = setup();
    const { res, body } = await post("/v1/completions", { prompt: "x" }, { "X-Task": "nope" });
    assert.equal(res.status, 404);
    assert.equal(body.error.type, "task_not_found");
    assert.equal(body.error.param, "X-Task");
    assert.equal(service.calls.length, 0);
  });

  it("answers an unknown model with 404 model_not_found", async () => {
    const { post } = setup();
    const { res, body } = await post("/v1/chat/completions", {
      model: "gpt-4",
      messages: [{ role: "user", content: "x" }],
    });
    assert.equal(res.status, 404);
    assert.equal(body.error.type, "model_not_found");
    assert.equal(body.error.param, "model");
  });

  it("never asks the service about a model that is not a valid task name", async () => {
    const { post, service } = setup();
    const { res } = await post("/v1/completions", { model: "../../etc/passwd", prompt: "x" });
    assert.equal(res.status, 404);
    assert.deepEqual(service.hasTaskCalls, []);
  });

  it("answers X-Task and model naming two different tasks with 400", async () => {
    const { post, service } = setup();
    const { res, body } = await post(
      "/v1/completions",
      { model: "classify", prompt: "x" },
      { "X-Task": "summarize" },
    );
    assert.equal(res.status, 400);
    assert.equal(body.error.param, "model");
    assert.equal(service.calls.length, 0);
  });

  it("accepts X-Task together with model naming the same task or the base model", async () => {
    const { post, service } = setup();
    for (const model of ["summarize", FAKE_MODEL_ID, "default"]) {
      const { res } = await post(
        "/v1/completions",
        { model, prompt: "x", max_tokens: 1 },
        { "X-Task": "summarize" },
      );
      assert.equal(res.status, 200);
    }
    assert.deepEqual(
      service.calls.map((c) => c.input.task),
      ["summarize", "summarize", "summarize"],
    );
  });

  it("answers X-Task with an unknown non-task model with 404 model_not_found", async () => {
    const { post } = setup();
    const { res, body } = await post(
      "/v1/completions",
      { model: "gpt-4", prompt: "x" },
      { "X-Task": "summarize" },
    );
    assert.equal(res.status, 404);
    assert.equal(body.error.type, "model_not_found");
  });
});
