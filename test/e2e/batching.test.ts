/**
 * Issue acceptance for continuous batching, over HTTP: 32 concurrent greedy requests (different prompt
 * lengths and max_tokens, half of them streaming, some cancelled midway) produce exactly the tokens each
 * produces alone; cancelled ones free their sequence and KV reservation.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createApp } from "../../src/http/app.ts";
import { parseSse, startServer, type TestServer } from "../helpers/server.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

let stack: TestStack;
let server: TestServer;

before(async () => {
  stack = await startTestStack({ maxBatchedTokens: 64 });
  server = await startServer(createApp({ service: stack.service }));
});
after(async () => {
  await server.close();
  await stack.dispose();
});

interface Choice {
  text: string;
  logprobs: { tokens: string[] };
}

const body = (i: number, stream: boolean) => ({
  prompt: `Story ${i}: ${"the little dog ran ".repeat(1 + ((i * 3) % 11))}`,
  max_tokens: 4 + ((i * 7) % 19),
  temperature: 0,
  ignore_eos: true,
  logprobs: 0,
  stream,
});

async function complete(i: number, stream: boolean, cancelAfterChunks = 0): Promise<string[]> {
  const controller = new AbortController();
  const res = await fetch(`${server.url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body(i, stream)),
    signal: controller.signal,
  });
  assert.equal(res.status, 200, `request ${i}`);
  if (!stream) return ((await res.json()) as { choices: Choice[] }).choices[0]!.logprobs.tokens;
  const tokens: string[] = [];
  let text = "";
  const decoder = new TextDecoder();
  const reader = res.body!.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
      const complete = text.slice(0, text.lastIndexOf("\n\n") + 2);
      const chunks = parseSse(complete).filter(
        (c): c is { choices: Choice[] } => typeof c === "object" && c !== null,
      );
      if (cancelAfterChunks > 0 && chunks.length >= cancelAfterChunks) {
        controller.abort();
        return chunks.flatMap((c) => c.choices[0]?.logprobs?.tokens ?? []);
      }
    }
  } catch (error) {
    if ((error as Error).name !== "AbortError") throw error;
  }
  for (const c of parseSse(text)) {
    if (typeof c === "object" && c !== null)
      tokens.push(...((c as { choices: Choice[] }).choices[0]?.logprobs?.tokens ?? []));
  }
  return tokens;
}

test("32 concurrent greedy requests (streaming, non-streaming, cancelled) equal each one alone", async () => {
  const alone: string[][] = [];
  for (let i = 0; i < 32; i++) alone.push(await complete(i, false));
  const batched = await Promise.all(
    Array.from({ length: 32 }, (_, i) => complete(i, i % 2 === 0, i % 8 === 6 ? 3 : 0)),
  );
  batched.forEach((tokens, i) => {
    if (i % 8 === 6) {
      assert.ok(tokens.length > 0 && tokens.length < alone[i]!.length, `request ${i} was cancelled midway`);
      assert.deepEqual(
        tokens,
        alone[i]!.slice(0, tokens.length),
        `cancelled request ${i} diverged before the cancel`,
      );
    } else {
      assert.deepEqual(
        tokens,
        alone[i],
        `request ${i} (${i % 2 === 0 ? "streaming" : "non-streaming"}) differs from alone`,
      );
    }
  });
  const deadline = Date.now() + 2000;
  while (stack.engine.kv.numSequences > 0 && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 5));
  assert.equal(stack.engine.kv.numSequences, 0, "cancelled sequences released their KV reservations");
  assert.equal(stack.engine.numRunningSequences, 0);
});
