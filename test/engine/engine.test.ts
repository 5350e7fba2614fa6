import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { EngineEvent } from "../../src/engine/events.ts";
import type { GenerationParams } from "../../src/engine/sequence.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const greedy = (overrides: Partial<GenerationParams> = {}): Partial<GenerationParams> => ({
  temperature: 0,
  ignoreEos: true,
  ...overrides,
});

async function collect(events: AsyncIterable<EngineEvent>) {
  const tokens: number[] = [];
  let text = "";
  let finish: EngineEvent | null = null;
  for await (const e of events) {
    if (e.type === "token") {
      tokens.push(e.tokenId);
      text += e.text;
    } else if (e.type === "finished" || e.type === "error") {
      finish = e;
      if (e.type === "finished") text += e.text;
    }
  }
  return { tokens, text, finish };
}

describe("engine on the tiny model", () => {
  let stack: TestStack;
  before(async () => {
    stack = await startTestStack();
  });
  after(async () => {
    await stack.dispose();
  });

  const prompts = Array.from(
    { length: 32 },
    (_, i) => `Request ${i}: ${"once upon a time ".repeat(1 + (i % 7))}`,
  );

  test("32 concurrent greedy requests equal each one run alone, with cancellations", async () => {
    const { service } = stack;
    const maxTokens = (i: number) => 3 + ((i * 5) % 17);
    const alone: number[][] = [];
    for (let i = 0; i < prompts.length; i++) {
      const h = await service.generate({
        requestId: `a${i}`,
        prompt: { kind: "text", text: prompts[i]! },
        task: null,
        params: greedy({ maxTokens: maxTokens(i) }),
      });
      alone.push((await collect(h.events)).tokens);
    }
    const controllers = prompts.map(() => new AbortController());
    const handles = await Promise.all(
      prompts.map((p, i) =>
        service.generate(
          {
            requestId: `b${i}`,
            prompt: { kind: "text", text: p },
            task: null,
            params: greedy({ maxTokens: maxTokens(i) }),
          },
          controllers[i]!.signal,
        ),
      ),
    );
    const results = await Promise.all(
      handles.map(async (h, i) => {
        const tokens: number[] = [];
        let finish: EngineEvent | null = null;
        for await (const e of h.events) {
          if (e.type === "token") {
            tokens.push(e.tokenId);
            if (i % 8 === 3 && tokens.length === 2) controllers[i]!.abort();
          } else finish = e;
        }
        return { tokens, finish };
      }),
    );
    results.forEach((r, i) => {
      if (i % 8 === 3) {
        assert.equal(r.finish?.type, "finished");
        assert.equal((r.finish as { reason: string }).reason, "cancelled");
        assert.deepEqual(
          r.tokens,
          alone[i]!.slice(0, r.tokens.length),
          `cancelled request ${i} diverged before cancel`,
        );
      } else {
        assert.deepEqual(r.tokens, alone[i], `request ${i} differs batched vs alone`);
      }
    });
    assert.equal(stack.engine.kv.numSequences, 0, "every KV reservation released");
  });

  test("a seeded sampled request gives the same tokens alone and batched", async () => {
    const { service } = stack;
    const params = { temperature: 0.9, topP: 0.9, topK: 40, seed: 1234, maxTokens: 12, ignoreEos: true };
    const alone = await collect(
      (
        await service.generate({
          requestId: "s0",
          prompt: { kind: "text", text: "hello" },
          task: null,
          params,
        })
      ).events,
    );
    const batch = await Promise.all(
      [0, 1, 2, 3].map(async (i) =>
        collect(
          (
            await service.generate({
              requestId: `s${i}`,
              prompt: { kind: "text", text: i === 0 ? "hello" : `other ${i}` },
              task: null,
              params,
            })
          ).events,
        ),
      ),
    );
    assert.deepEqual(batch[0]!.tokens, alone.tokens);
  });

  test("max_tokens, stop strings and usage", async () => {
    const { service } = stack;
    const r = await collect(
      (
        await service.generate({
          requestId: "m",
          prompt: { kind: "text", text: "abc" },
          task: null,
          params: greedy({ maxTokens: 5 }),
        })
      ).events,
    );
    assert.equal(r.tokens.length, 5);
    assert.equal(r.finish?.type, "finished");
    assert.equal((r.finish as { reason: string }).reason, "length");
    const stopAt = r.text.slice(2, 4);
    if (stopAt.length === 2) {
      const s = await collect(
        (
          await service.generate({
            requestId: "m2",
            prompt: { kind: "text", text: "abc" },
            task: null,
            params: greedy({ maxTokens: 5, stop: [stopAt] }),
          })
        ).events,
      );
      assert.equal((s.finish as { reason: string }).reason, "stop");
      assert.ok(!s.text.includes(stopAt));
      assert.equal(s.text, r.text.slice(0, r.text.indexOf(stopAt)));
    }
  });

  test("a prompt longer than the context is refused with both numbers", async () => {
    await assert.rejects(
      stack.service.generate({
        requestId: "x",
        prompt: { kind: "tokens", tokens: Array(600).fill(5) },
        task: null,
        params: greedy({ maxTokens: 10 }),
      }),
      /600 tokens.*exceeds the context window of 512/,
    );
  });
});
