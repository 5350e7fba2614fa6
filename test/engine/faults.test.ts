/**
 * Fault isolation: a failing step (an exception inside onnxruntime, NaN logits in one row, a slow step) ends only
 * the sequences it affects, with an `error` event (over HTTP: one `data: {"error": ...}` frame); the step loop
 * keeps serving the rest with the same tokens as without the fault, KV reservations are released, and later
 * requests succeed. The faults are injected by a ModelBackend proxy around the real in-process runner.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { EngineEvent } from "../../src/engine/events.ts";
import type { GenerationParams } from "../../src/engine/sequence.ts";
import { createApp } from "../../src/http/app.ts";
import { type FaultyStack, faultyStack } from "../helpers/faulty-backend.ts";
import { parseSse, postJson, withTimeout } from "../helpers/server.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const greedy = (maxTokens: number): Partial<GenerationParams> => ({
  temperature: 0,
  ignoreEos: true,
  maxTokens,
});

interface Outcome {
  tokens: number[];
  last: EngineEvent | null;
}

/** Reads events to the end; `onToken` runs after each token (to inject a fault mid-sequence). */
async function collect(
  events: AsyncIterable<EngineEvent>,
  onToken?: (count: number) => void,
): Promise<Outcome> {
  const tokens: number[] = [];
  let last: EngineEvent | null = null;
  for await (const event of events) {
    if (event.type === "token") {
      tokens.push(event.tokenId);
      onToken?.(tokens.length);
    } else if (event.type === "finished" || event.type === "error") last = event;
  }
  return { tokens, last };
}

function generate(s: FaultyStack, text: string, maxTokens: number, extra: Partial<GenerationParams> = {}) {
  return s.service.generate({
    requestId: text,
    prompt: { kind: "text", text },
    task: null,
    params: { ...greedy(maxTokens), ...extra },
  });
}

function assertIdle(s: FaultyStack) {
  assert.equal(s.engine.numRunningSequences, 0, "no sequence left running");
  assert.equal(s.engine.numWaitingSequences, 0, "no sequence left waiting");
  assert.equal(s.engine.kv.usageFraction, 0, "every KV reservation released");
}

const finishReason = (o: Outcome) => (o.last?.type === "finished" ? o.last.reason : o.last?.type);
const errorMessage = (o: Outcome) => (o.last?.type === "error" ? o.last.error.message : "");

describe("fault isolation in the step loop", () => {
  let stack: TestStack;
  /** Greedy tokens of each prompt run alone without faults. */
  const alone = new Map<string, number[]>();
  const PROMPTS = {
    long: "Once upon a time there was",
    victim: "The cat sat on the mat and",
    other: "Hello",
  };

  before(async () => {
    stack = await startTestStack();
    const s = faultyStack(stack.model);
    for (const [key, text] of Object.entries(PROMPTS))
      alone.set(key, (await collect((await generate(s, text, 24)).events)).tokens);
    assertIdle(s);
  });
  after(async () => {
    await stack.dispose();
  });

  test("a forward that throws fails only the sequences of that step; a running stream keeps its tokens", async () => {
    const s = faultyStack(stack.model);
    const long = await generate(s, PROMPTS.long, 24);
    let victimDone: Promise<Outcome> | undefined;
    const longDone = collect(long.events, (count) => {
      if (count !== 3) return;
      // The next step made only of fresh sequences (past length 0) is the victim's prefill: it throws.
      let fired = false;
      s.backend.faults.throwWhen = (batch) => {
        if (fired || !batch.rows.every((r) => r.pastLength === 0)) return false;
        fired = true;
        return true;
      };
      victimDone = generate(s, PROMPTS.victim, 24).then((h) => collect(h.events));
    });
    const longOutcome = await withTimeout(longDone, 20_000, "the long sequence");
    const victim = await withTimeout(victimDone!, 20_000, "the victim");
    assert.equal(victim.last?.type, "error");
    assert.match(errorMessage(victim), /model step failed: injected onnxruntime failure/);
    assert.equal(victim.tokens.length, 0);
    assert.equal(finishReason(longOutcome), "length");
    assert.deepEqual(longOutcome.tokens, alone.get("long"), "the running sequence is untouched");
    assertIdle(s);
    s.backend.faults = {};
    const later = await collect((await generate(s, PROMPTS.victim, 24)).events);
    assert.deepEqual(later.tokens, alone.get("victim"), "a later request succeeds with the usual tokens");
    assertIdle(s);
  });

  test("every sequence of a step whose forward throws gets one error event and its KV back", async () => {
    const s = faultyStack(stack.model);
    // The third step that holds both sequences throws.
    let numPairSteps = 0;
    s.backend.faults.throwWhen = (batch) => batch.rows.length === 2 && ++numPairSteps === 3;
    const handles = await Promise.all([generate(s, PROMPTS.long, 24), generate(s, PROMPTS.victim, 24)]);
    const ids = handles.map((h) => h.seqId);
    const outcomes = await withTimeout(Promise.all(handles.map((h) => collect(h.events))), 20_000, "both");
    for (const o of outcomes) {
      assert.equal(o.last?.type, "error");
      assert.equal(o.last?.type === "error" && o.last.error.type, "internal");
      assert.ok(o.tokens.length > 0 && o.tokens.length < 24, `stopped mid-way (${o.tokens.length} tokens)`);
    }
    for (const id of ids) assert.ok(s.backend.released.includes(id), `sequence ${id}'s cache released`);
    assertIdle(s);
    const later = await collect((await generate(s, PROMPTS.other, 24)).events);
    assert.equal(finishReason(later), "length");
    assert.deepEqual(later.tokens, alone.get("other"));
  });

  test("NaN logits in one row fail only that row's sequence; its batch-mates finish unchanged", async () => {
    const s = faultyStack(stack.model);
    const [long, victim, other] = await Promise.all([
      generate(s, PROMPTS.long, 24),
      generate(s, PROMPTS.victim, 24),
      generate(s, PROMPTS.other, 24),
    ]);
    const victimDone = collect(victim.events, (count) => {
      if (count === 5) s.backend.faults.poisonSeqIds = new Set([victim.seqId]);
    });
    const [l, v, o] = await withTimeout(
      Promise.all([collect(long.events), victimDone, collect(other.events)]),
      20_000,
      "three sequences",
    );
    assert.equal(v.last?.type, "error");
    assert.match(errorMessage(v), /non-finite logits/);
    assert.deepEqual(
      v.tokens,
      alone.get("victim")!.slice(0, v.tokens.length),
      "tokens before the fault were right",
    );
    assert.ok(v.tokens.length >= 5 && v.tokens.length < 24);
    assert.deepEqual(l.tokens, alone.get("long"));
    assert.deepEqual(o.tokens, alone.get("other"));
    assert.equal(finishReason(l), "length");
    assert.ok(s.backend.released.includes(victim.seqId));
    assertIdle(s);
  });

  test("over HTTP the failed stream gets one error frame and no [DONE]; a concurrent request gets 200", async () => {
    const s = faultyStack(stack.model);
    const app = createApp({ service: s.service });
    const streamed = await postJson(app, "/v1/completions", {
      prompt: PROMPTS.victim,
      max_tokens: 40,
      temperature: 0,
      ignore_eos: true,
      stream: true,
    });
    assert.equal(streamed.status, 200);
    const reader = streamed.body!.getReader();
    const decoder = new TextDecoder();
    let text = "";
    while ((text.match(/"text"/g) ?? []).length < 3) {
      const { value, done } = await withTimeout(reader.read(), 10_000, "the first chunks");
      assert.ok(!done);
      text += decoder.decode(value, { stream: true });
    }
    s.backend.faults.poisonSeqIds = new Set(s.backend.lastSeqIds);
    const plain = postJson(app, "/v1/completions", {
      prompt: PROMPTS.other,
      max_tokens: 24,
      temperature: 0,
      ignore_eos: true,
    });
    for (;;) {
      const { value, done } = await withTimeout(reader.read(), 10_000, "the rest of the stream");
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    const frames = parseSse(text);
    const errors = frames.filter((f) => typeof f === "object" && f !== null && "error" in f);
    assert.equal(errors.length, 1, "exactly one error frame");
    assert.deepEqual(frames.at(-1), errors[0], "the error frame is the last one");
    assert.ok(!frames.includes("[DONE]"));
    const { error } = errors[0] as { error: Record<string, unknown> };
    assert.equal(error.type, "internal");
    assert.match(String(error.message), /non-finite logits/);
    assert.deepEqual(Object.keys(error).sort(), ["code", "message", "param", "type"]);
    const res = await withTimeout(plain, 20_000, "the concurrent request");
    assert.equal(res.status, 200);
    const body = (await res.json()) as {
      choices: { finish_reason: string }[];
      usage: { completion_tokens: number };
    };
    assert.equal(body.choices[0]!.finish_reason, "length");
    assert.equal(body.usage.completion_tokens, 24);
    assertIdle(s);
  });

  test("a waiting sequence meets its deadline while a slow step holds the loop", async () => {
    const s = faultyStack(stack.model, { maxNumSeqs: 1 });
    s.backend.faults.delayMs = 400;
    const running = await generate(s, PROMPTS.long, 4);
    const started = performance.now();
    const waiting = await generate(s, PROMPTS.victim, 24, { deadlineMs: 100 });
    const w = await withTimeout(collect(waiting.events), 5_000, "the waiting sequence");
    const elapsedMs = performance.now() - started;
    assert.equal(finishReason(w), "length");
    assert.equal(w.tokens.length, 0);
    assert.ok(
      elapsedMs < 350,
      `ended ${elapsedMs.toFixed(0)} ms after submit, before the 400 ms step finished`,
    );
    const r = await withTimeout(collect(running.events), 10_000, "the running sequence");
    assert.equal(finishReason(r), "length");
    assert.deepEqual(r.tokens, alone.get("long")!.slice(0, 4));
    assertIdle(s);
  });

  test("a running sequence past its deadline ends with finish_reason length at the next step", async () => {
    const s = faultyStack(stack.model);
    s.backend.faults.delayMs = 50;
    const h = await generate(s, PROMPTS.long, 200, { deadlineMs: 300 });
    const o = await withTimeout(collect(h.events), 5_000, "the sequence");
    assert.equal(finishReason(o), "length");
    assert.ok(
      o.tokens.length > 0 && o.tokens.length < 20,
      `${o.tokens.length} tokens in 300 ms of 50 ms steps`,
    );
    assertIdle(s);
  });
});
