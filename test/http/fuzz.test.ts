/**
 * Input fuzzing over a real socket: a few thousand seeded, generated malformed requests (wrong types, huge and
 * negative numbers, invalid UTF-8, deeply nested JSON, header injection in X-Task, unicode task names, empty and
 * giant prompts, and bytes Node's HTTP parser itself refuses) against createApp + the real in-process engine.
 * Every answer must be a 4xx JSON error in OpenAI's shape; afterwards the server is healthy, the engine idle,
 * and a normal request succeeds.
 */
import assert from "node:assert/strict";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";
import { createApp } from "../../src/http/app.ts";
import { makeRng, type Rng } from "../../src/model/maker/prng.ts";
import { startServer, type TestServer } from "../helpers/server.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const SEED = 20261125;
const NUM_CASES = 3000;
const CONCURRENCY = 16;
const ERROR_TYPES = new Set([
  "invalid_request",
  "task_not_found",
  "model_not_found",
  "payload_too_large",
  "overloaded",
]);

interface RawResponse {
  status: number;
  headers: Map<string, string>;
  body: string;
}

/** Writes raw bytes on a fresh connection and reads one response (until Content-Length is met or the socket ends). */
function rawExchange(port: number, bytes: Buffer, timeoutMs = 10_000): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer in ${timeoutMs} ms`));
    }, timeoutMs);
    const finish = () => {
      const parsed = parseResponse(Buffer.concat(chunks));
      if (!parsed) return false;
      clearTimeout(timer);
      socket.destroy();
      resolve(parsed);
      return true;
    };
    socket.on("data", (d) => {
      chunks.push(d);
      finish();
    });
    socket.on("error", () => {}); // a reset after the answer is fine; no answer is caught below
    socket.on("close", () => {
      if (!finish()) {
        clearTimeout(timer);
        reject(
          new Error(
            `connection closed without a complete answer: ${Buffer.concat(chunks).toString().slice(0, 200)}`,
          ),
        );
      }
    });
    socket.write(bytes);
  });
}

function parseResponse(data: Buffer): RawResponse | null {
  const end = data.indexOf("\r\n\r\n");
  if (end < 0) return null;
  const [statusLine, ...lines] = data.subarray(0, end).toString("latin1").split("\r\n");
  const headers = new Map(
    lines.map((l) => [l.slice(0, l.indexOf(":")).toLowerCase(), l.slice(l.indexOf(":") + 1).trim()]),
  );
  const length = Number(headers.get("content-length") ?? Number.NaN);
  const body = data.subarray(end + 4);
  if (!Number.isFinite(length) || body.length < length) return null;
  return {
    status: Number(statusLine!.split(" ")[1]),
    headers,
    body: body.subarray(0, length).toString("utf8"),
  };
}

/** A complete HTTP/1.1 request; `body` may be bytes (invalid UTF-8) and headers may hold anything. */
function httpRequest(
  method: string,
  path: string,
  body: string | Buffer | null,
  headers: string[] = [],
): Buffer {
  const payload = body === null ? Buffer.alloc(0) : Buffer.isBuffer(body) ? body : Buffer.from(body, "utf8");
  const head = [`${method} ${path} HTTP/1.1`, "Host: 127.0.0.1", "Connection: close", ...headers];
  if (body !== null) head.push("Content-Type: application/json", `Content-Length: ${payload.length}`);
  return Buffer.concat([Buffer.from(`${head.join("\r\n")}\r\n\r\n`, "latin1"), payload]);
}

const pick = <T>(rng: Rng, items: readonly T[]): T => items[rng.int(items.length)]!;
const nest = (depth: number, open: string, close: string, inner = "1") =>
  open.repeat(depth) + inner + close.repeat(depth);

/** Values each field must refuse (null is "unset" for optional fields, so it is only bad for required ones). */
const BAD_COMMON: Record<string, unknown[]> = {
  max_tokens: ["16", -1, 1.5, 1e20, 2 ** 53, -1e308, true, [], {}],
  temperature: [-0.1, -1e308, 2.0001, 1e308, "0.5", true, [], {}],
  top_p: [0, -1, 1.0001, 1e9, "1", false, [0.5]],
  top_k: [-1, 0.5, "5", [], 1e300],
  seed: [1.5, 2 ** 60, "42", {}, -1e300],
  stop: [5, [1], ["a", "b", "c", "d", "e"], [""], "", { a: 1 }, [["a"]]],
  n: [0, -1, 1.5, 17, 1e9, "2", true],
  stream: ["true", 1, {}],
  stream_options: ["x", 5, { include_usage: "yes" }],
  user: [5, {}, []],
  ignore_eos: ["no", 0],
  taskmux: [5, { fields: 5 }, { fields: { a: 1 } }, { fields: [] }],
  model: [5, [], {}, "no-such-model", "../../etc/passwd", "naïve", "タスク", "🙂", "a/b", "..", ""],
};
const BAD_COMPLETION: Record<string, unknown[]> = {
  ...BAD_COMMON,
  prompt: [
    5,
    true,
    null,
    {},
    { text: "x" },
    [],
    [[]],
    [1.5],
    [-1],
    [1e9],
    ["a", 1],
    [[1], [2, "x"]],
    [null],
    "",
  ],
  echo: ["yes", 1, []],
  logprobs: [-1, 6, 1e9, 2.5, "1", true],
};
const BAD_CHAT: Record<string, unknown[]> = {
  ...BAD_COMMON,
  messages: [
    [],
    null,
    "hi",
    [{}],
    [{ role: 5, content: "x" }],
    [{ role: "", content: "x" }],
    [{ content: "x" }],
    [{ role: "user", content: 5 }],
    [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }],
    [{ role: "user", content: [{ type: "text", text: 5 }] }],
    [1, 2],
  ],
  logprobs: [2, "true", {}],
  top_logprobs: [21, -1, 1.5, "3"],
  max_completion_tokens: [-1, "x", 1e20, 0.5],
};

const validCompletion = () => ({ prompt: "Once upon a time", max_tokens: 1 });
const validChat = () => ({ messages: [{ role: "user", content: "Hi" }], max_tokens: 1 });

/** One malformed request per call; the category name is returned for the diagnostics. */
const GENERATORS: [string, (rng: Rng) => Buffer][] = [
  [
    "wrong type or range",
    (rng) => {
      const chat = rng.uniform() < 0.4;
      const table = chat ? BAD_CHAT : BAD_COMPLETION;
      const field = pick(rng, Object.keys(table));
      const body = { ...(chat ? validChat() : validCompletion()), [field]: pick(rng, table[field]!) };
      return httpRequest("POST", chat ? "/v1/chat/completions" : "/v1/completions", JSON.stringify(body));
    },
  ],
  [
    "invalid UTF-8 in a string",
    (rng) => {
      const bad = pick(rng, [
        [0xff],
        [0xc3, 0x28],
        [0xed, 0xa0, 0x80],
        [0xf8, 0x88, 0x80, 0x80, 0x80],
        [0xe2, 0x82],
        [0x80],
      ]);
      const key = pick(rng, ["prompt", "user", "some_unknown_field"]);
      const [head, tail] = [`{"max_tokens":1,"prompt":"ok","${key}":"abc`, `def"}`];
      return httpRequest(
        "POST",
        "/v1/completions",
        Buffer.concat([Buffer.from(head), Buffer.from(bad), Buffer.from(tail)]),
      );
    },
  ],
  [
    "deeply nested JSON",
    (rng) => {
      const depth = pick(rng, [100, 1000, 10_000, 100_000]);
      const deep = nest(depth, "[", "]");
      const body = pick(rng, [
        `{"prompt":${deep},"max_tokens":1}`,
        `{"prompt":"x","stop":${deep}}`,
        `{"messages":[{"role":"user","content":${deep}}]}`,
        `{"prompt":"x","taskmux":{"fields":{"a":${nest(depth, '{"a":', "}")}}}}`,
        deep,
        nest(depth, '{"a":', "}"),
        "[".repeat(depth),
      ]);
      return httpRequest("POST", pick(rng, ["/v1/completions", "/v1/chat/completions"]), body);
    },
  ],
  [
    "X-Task header injection",
    (rng) => {
      const value = pick(rng, [
        "a\r\nX-Evil: 1",
        "a\nb",
        "a\rb",
        "a\u0000b",
        "a\u007fb",
        "a\tb",
        "../../etc/passwd",
        "a/b",
        "..",
        ".",
        "",
        "x".repeat(65),
        "naïve",
        "タスク",
        "🙂",
        "lora-demo, polite",
        "no-such-task",
        "\tspaced\t",
      ]);
      const header = Buffer.concat([Buffer.from("X-Task: "), Buffer.from(value, "utf8")]).toString("latin1");
      const chat = rng.uniform() < 0.5;
      return httpRequest(
        "POST",
        chat ? "/v1/chat/completions" : "/v1/completions",
        JSON.stringify(chat ? validChat() : validCompletion()),
        [header],
      );
    },
  ],
  [
    "empty or giant prompt",
    (rng) => {
      const prompt = pick(rng, [
        "",
        [],
        [[]],
        "word ".repeat(2000),
        Array(600).fill(5),
        [Array(600).fill(7)],
        "x".repeat(1_100_000),
      ]);
      const chat = rng.uniform() < 0.3;
      // A chat prompt is never empty (the template adds tokens): there, max_tokens beyond the context is the fault.
      const content = typeof prompt === "string" ? prompt : [];
      const body = chat
        ? { messages: [{ role: "user", content }], max_tokens: 100_000 }
        : { prompt, max_tokens: 1 };
      return httpRequest("POST", chat ? "/v1/chat/completions" : "/v1/completions", JSON.stringify(body));
    },
  ],
  [
    "not JSON or not an object",
    (rng) => {
      const body = pick(rng, [
        "{",
        "{'prompt':'x'}",
        "nul",
        '"str"',
        "1",
        "[]",
        "null",
        "true",
        "",
        "   ",
        '{"prompt":"x",}',
        "NaN",
        '{"prompt": Infinity}',
        "\u0000",
      ]);
      return httpRequest("POST", pick(rng, ["/v1/completions", "/v1/chat/completions"]), body);
    },
  ],
  [
    "wrong route or method",
    (rng) => {
      const [method, path] = pick(rng, [
        ["GET", "/v1/completions"],
        ["DELETE", "/v1/models"],
        ["POST", "/v1/unknown"],
        ["GET", "/../../etc/passwd"],
        ["GET", "/v1/models/../../etc/passwd"],
        ["PUT", "/v1/chat/completions"],
        ["GET", "/%2e%2e/%2e%2e/etc/passwd"],
      ]);
      return httpRequest(
        method!,
        path!,
        method === "POST" || method === "PUT" ? JSON.stringify(validCompletion()) : null,
      );
    },
  ],
  [
    "bytes the HTTP parser refuses",
    (rng) => {
      const valid = JSON.stringify(validCompletion());
      const raw = pick(rng, [
        "GARBAGE\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        `POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n${valid}`,
        `POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n${valid}`,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX Task: a\r\n\r\n",
        "G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
        `GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ${"a".repeat(20_000)}\r\n\r\n`,
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Task: a\u0000b\r\n\r\n",
        "GET /v1/mo\u0001dels HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        "\r\n\r\n\r\n\u0016\u0003\u0001\u0002\u0000\u0001\u0000\u0001\u00fc\u0003\u0003",
      ]);
      return Buffer.from(raw, "latin1");
    },
  ],
  [
    "body over the limit, or shorter than its Content-Length",
    (rng) => {
      if (rng.uniform() < 0.3)
        return httpRequest("POST", "/v1/completions", `{"prompt":"${"a".repeat(1_100_000)}"}`);
      // The body is cut at Content-Length (never a whole JSON object); the rest arrives as a garbage next request.
      const body = JSON.stringify(validCompletion());
      const head = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: ${1 + rng.int(body.length - 2)}`;
      return Buffer.from(`${head}\r\n\r\n${body}`);
    },
  ],
];

function assertOpenAIError(res: RawResponse, what: string): void {
  assert.ok(res.status >= 400 && res.status < 500, `${what}: status ${res.status} ${res.body.slice(0, 200)}`);
  assert.match(res.headers.get("content-type") ?? "", /^application\/json/, `${what}: content-type`);
  const { error } = JSON.parse(res.body) as { error: Record<string, unknown> };
  assert.deepEqual(Object.keys(error).sort(), ["code", "message", "param", "type"], what);
  assert.ok(typeof error.message === "string" && error.message.length > 0, what);
  assert.ok(ERROR_TYPES.has(error.type as string), `${what}: type ${String(error.type)}`);
  assert.ok(error.param === null || typeof error.param === "string", what);
  assert.equal(typeof error.code, "string", what);
}

describe("fuzzing the HTTP layer over a real socket", () => {
  let stack: TestStack;
  let server: TestServer;
  let port: number;
  before(async () => {
    stack = await startTestStack();
    server = await startServer(createApp({ service: stack.service }));
    port = Number(new URL(server.url).port);
  });
  after(async () => {
    await server.close();
    await stack.dispose();
  });

  test(`${NUM_CASES} malformed requests all get a 4xx JSON error in OpenAI's shape`, async (t) => {
    const rng = makeRng(SEED);
    const cases = Array.from({ length: NUM_CASES }, (_, i) => {
      const [name, make] = GENERATORS[i % GENERATORS.length]!;
      return { name, bytes: make(rng) };
    });
    const byStatus = new Map<number, number>();
    const byCategory = new Map<string, number>();
    const failures: string[] = [];
    let next = 0;
    await Promise.all(
      Array.from({ length: CONCURRENCY }, async () => {
        while (next < cases.length) {
          const index = next++;
          const { name, bytes } = cases[index]!;
          byCategory.set(name, (byCategory.get(name) ?? 0) + 1);
          try {
            const res = await rawExchange(port, bytes);
            byStatus.set(res.status, (byStatus.get(res.status) ?? 0) + 1);
            assertOpenAIError(res, `case ${index} (${name}): ${bytes.subarray(0, 120).toString("latin1")}`);
          } catch (error) {
            failures.push((error as Error).message);
          }
        }
      }),
    );
    t.diagnostic(`sent ${cases.length} (seed ${SEED})`);
    t.diagnostic(
      `by status: ${JSON.stringify(Object.fromEntries([...byStatus].sort((a, b) => a[0] - b[0])))}`,
    );
    t.diagnostic(`by category: ${JSON.stringify(Object.fromEntries(byCategory))}`);
    assert.deepEqual(failures.slice(0, 5), [], `${failures.length} failures`);
  });

  test("afterwards the server is healthy, the engine idle, and a normal request succeeds", async () => {
    assert.equal((await fetch(`${server.url}/health`)).status, 200);
    assert.equal(stack.engine.numRunningSequences, 0);
    assert.equal(stack.engine.numWaitingSequences, 0);
    assert.equal(stack.engine.kv.usageFraction, 0);
    // Unknown fields are ignored, however deep (vLLM does the same).
    // ignore_eos: a sampled end-of-sequence token would otherwise end this 4-token request early now and then.
    const body = `{"prompt":"Once upon a time","max_tokens":4,"ignore_eos":true,"extra":${nest(10_000, "[", "]")}}`;
    const res = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
    });
    assert.equal(res.status, 200);
    const json = (await res.json()) as {
      choices: { finish_reason: string }[];
      usage: { completion_tokens: number };
    };
    assert.equal(json.usage.completion_tokens, 4);
  });
});
