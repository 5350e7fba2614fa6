/** Tests for the Scheduler: admission limits, chunked prefill, decode/prefill alternation, FIFO, removal, 429. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { KvCacheAccount } from "../../src/engine/kv-cache.ts";
import { type SchedulableSequence, type ScheduledStep, Scheduler } from "../../src/engine/scheduler.ts";
import { TaskmuxError } from "../../src/errors.ts";

/** A sequence reduced to counts: numTokens = prompt + generated, as engine/sequence.ts defines it. */
class FakeSeq implements SchedulableSequence {
  numComputedTokens = 0;
  generated = 0;
  /** Step numbers (1-based) at which this sequence received a token. */
  readonly tokenSteps: number[] = [];
  isFinished = false;

  constructor(
    readonly id: number,
    readonly prompt: number,
    readonly maxTokens: number,
  ) {}

  get numTokens(): number {
    return this.prompt + this.generated;
  }

  get maxTotalTokens(): number {
    return this.prompt + this.maxTokens;
  }
}

let nextId = 1;
function makeSeq({
  id = nextId++,
  prompt = 8,
  maxTokens = 4,
}: {
  id?: number;
  prompt?: number;
  maxTokens?: number;
} = {}) {
  return new FakeSeq(id, prompt, maxTokens);
}

interface HarnessOptions {
  maxNumSeqs?: number;
  maxBatchedTokens?: number;
  maxWaiting?: number;
  /** KV capacity in tokens (1 byte per token). */
  kvTokens?: number;
}

/** A scheduler plus a fake model loop that does what the engine does after each step. */
function makeHarness({
  maxNumSeqs = 8,
  maxBatchedTokens = 64,
  maxWaiting = 64,
  kvTokens = 1 << 20,
}: HarnessOptions = {}) {
  const kv = new KvCacheAccount({ capacityBytes: kvTokens, bytesPerToken: 1 });
  const scheduler = new Scheduler<FakeSeq>({ maxNumSeqs, maxBatchedTokens, maxWaiting }, kv);
  let stepNumber = 0;
  const steps: ScheduledStep<FakeSeq>[] = [];

  /** Schedule one step, check its shape, and simulate the forward pass: compute, sample, finish. */
  const step = (): ScheduledStep<FakeSeq> | null => {
    const scheduled = scheduler.schedule();
    if (scheduled === null) return null;
    stepNumber++;
    steps.push(scheduled);
    const rows = scheduled.works.length;
    const longest = Math.max(...scheduled.works.map((w) => w.numTokens));
    assert.ok(rows * longest <= maxBatchedTokens, `step ${stepNumber}: ${rows} x ${longest} over budget`);
    assert.ok(rows <= maxNumSeqs, `step ${stepNumber}: ${rows} rows > maxNumSeqs`);
    assert.ok(kv.usageFraction <= 1, `step ${stepNumber}: KV over-reserved (${kv.usageFraction})`);
    for (const { seq, numTokens } of scheduled.works) {
      assert.ok(numTokens >= 1 && numTokens <= seq.numTokens - seq.numComputedTokens);
      if (scheduled.kind === "decode") assert.equal(numTokens, 1);
      seq.numComputedTokens += numTokens;
      if (seq.numComputedTokens === seq.numTokens) {
        seq.generated++;
        seq.tokenSteps.push(stepNumber);
        if (seq.generated >= seq.maxTokens) {
          seq.isFinished = true;
          scheduler.remove(seq);
        }
      }
    }
    return scheduled;
  };

  /** Step until `done()` holds; fails if it takes more than `maxSteps`. Returns the steps taken. */
  const stepUntil = (done: () => boolean, maxSteps = 10_000): number => {
    let taken = 0;
    while (!done()) {
      assert.ok(taken < maxSteps, `not done after ${maxSteps} steps`);
      assert.notEqual(step(), null, "scheduler idle before done");
      taken++;
    }
    return taken;
  };

  return {
    kv,
    scheduler,
    step,
    stepUntil,
    steps,
    get stepNumber() {
      return stepNumber;
    },
  };
}

const idsOf = (s: ScheduledStep<FakeSeq> | null) => s?.works.map((w) => w.seq.id) ?? [];

test("admits at most maxNumSeqs sequences and admits the next one when a sequence finishes", () => {
  for (const maxNumSeqs of [1, 2, 3]) {
    const h = makeHarness({ maxNumSeqs });
    const seqs = Array.from({ length: 5 }, (_, i) => makeSeq({ id: i, prompt: 4, maxTokens: 2 }));
    for (const s of seqs) h.scheduler.add(s);
    const first = h.step();
    assert.equal(first?.kind, "prefill");
    assert.deepEqual(
      idsOf(first),
      seqs.slice(0, maxNumSeqs).map((s) => s.id),
    );
    assert.equal(h.scheduler.numRunning, maxNumSeqs);
    assert.equal(h.scheduler.numWaiting, 5 - maxNumSeqs);
    // The first batch decodes its second (last) token; then the next sequence is admitted.
    h.stepUntil(() => seqs[0]!.isFinished);
    const next = h.step();
    assert.equal(next?.kind, "prefill");
    assert.equal(idsOf(next)[0], maxNumSeqs, "the next waiting sequence is admitted");
    h.stepUntil(() => !h.scheduler.hasWork);
    assert.ok(seqs.every((s) => s.isFinished));
  }
});

test("admits prefill rows only while rows x longest chunk fits the token budget", () => {
  const cases: { name: string; prompts: number[]; budget: number; admitted: number; chunks: number[] }[] = [
    { name: "four 10s in 32", prompts: [10, 10, 10, 10], budget: 32, admitted: 3, chunks: [10, 10, 10] },
    { name: "long first blocks a short second", prompts: [20, 5], budget: 32, admitted: 1, chunks: [20] },
    { name: "short first, long second", prompts: [5, 20], budget: 32, admitted: 1, chunks: [5] },
    {
      name: "eight 4s exactly fill 32",
      prompts: [4, 4, 4, 4, 4, 4, 4, 4, 4],
      budget: 32,
      admitted: 8,
      chunks: Array(8).fill(4),
    },
    { name: "a prompt over the budget is chunked", prompts: [100, 3], budget: 32, admitted: 1, chunks: [32] },
  ];
  for (const c of cases) {
    const h = makeHarness({ maxBatchedTokens: c.budget, maxNumSeqs: 16 });
    for (const prompt of c.prompts) h.scheduler.add(makeSeq({ prompt }));
    const s = h.step();
    assert.equal(s?.kind, "prefill", c.name);
    assert.equal(s?.works.length, c.admitted, c.name);
    assert.deepEqual(
      s?.works.map((w) => w.numTokens),
      c.chunks,
      c.name,
    );
    assert.equal(h.scheduler.numWaiting, c.prompts.length - c.admitted, c.name);
  }
});

test("a sequence waits for KV space until another finishes and releases its reservation", () => {
  // Each sequence needs at most 64 tokens -> a 64-token reservation; 128 tokens hold two. a finishes first.
  const h = makeHarness({ kvTokens: 128, maxBatchedTokens: 128 });
  const [a, b, c] = [4, 14, 10].map((maxTokens, id) => makeSeq({ id, prompt: 50, maxTokens }));
  for (const s of [a!, b!, c!]) h.scheduler.add(s);
  assert.deepEqual(idsOf(h.step()), [0, 1]);
  assert.equal(h.kv.usageFraction, 1);
  assert.equal(h.scheduler.numWaiting, 1);
  h.stepUntil(() => a!.isFinished);
  assert.equal(c!.numComputedTokens, 0, "c must not start while the cache is fully reserved");
  assert.equal(h.kv.numSequences, 1, "a's reservation is released when it finishes");
  h.stepUntil(() => c!.numComputedTokens > 0);
  assert.ok(h.scheduler.isRunning(c!));
  h.stepUntil(() => !h.scheduler.hasWork);
  assert.equal(h.kv.numSequences, 0);
  assert.equal(h.kv.usageFraction, 0);
});

test("refuses a sequence that could never fit the KV cache with invalid_request naming max_tokens", () => {
  const h = makeHarness({ kvTokens: 128 });
  assert.throws(
    () => h.scheduler.add(makeSeq({ prompt: 100, maxTokens: 100 })),
    (error: unknown) =>
      error instanceof TaskmuxError &&
      error.type === "invalid_request" &&
      error.param === "max_tokens" &&
      /max_tokens = 200/.test(error.message) &&
      /128/.test(error.message),
  );
  assert.equal(h.scheduler.numWaiting, 0);
  assert.equal(h.scheduler.hasWork, false);
  // Exactly at capacity is accepted.
  h.scheduler.add(makeSeq({ prompt: 100, maxTokens: 28 }));
  assert.equal(h.scheduler.numWaiting, 1);
});

test("prefills a long prompt in chunks of at most the budget, making progress every prefill step", () => {
  const h = makeHarness({ maxBatchedTokens: 64 });
  const long = makeSeq({ prompt: 300, maxTokens: 1 });
  h.scheduler.add(long);
  const chunks: number[] = [];
  while (long.generated === 0) {
    const before = long.numComputedTokens;
    const s = h.step();
    assert.equal(s?.kind, "prefill");
    chunks.push(long.numComputedTokens - before);
  }
  assert.deepEqual(chunks, [64, 64, 64, 64, 44]);
  assert.equal(long.isFinished, true);
  assert.equal(h.scheduler.schedule(), null);
});

test("running streams keep decoding at least every 2 steps while a 2000-token prompt prefills", () => {
  for (const numDecoders of [1, 3]) {
    const budget = 128;
    const h = makeHarness({ maxBatchedTokens: budget, maxNumSeqs: 8 });
    const decoders = Array.from({ length: numDecoders }, () => makeSeq({ prompt: 4, maxTokens: 10_000 }));
    for (const d of decoders) h.scheduler.add(d);
    h.step(); // prefill the decoders
    const long = makeSeq({ prompt: 2000, maxTokens: 4 });
    h.scheduler.add(long);
    const start = h.stepNumber;
    let prefillSteps = 0;
    while (long.numComputedTokens < long.prompt) {
      const before = long.numComputedTokens;
      const s = h.step();
      if (s?.kind === "prefill") {
        prefillSteps++;
        assert.ok(long.numComputedTokens > before, "every prefill step advances the long prompt");
      }
      assert.ok(h.stepNumber - start < 100, "long prompt prefill did not finish");
    }
    assert.equal(prefillSteps, Math.ceil(2000 / budget));
    // The long prefill took ~2x its chunk count: every other step was a decode step.
    assert.ok(h.stepNumber - start <= 2 * prefillSteps + 1, `took ${h.stepNumber - start} steps`);
    for (const d of decoders) {
      const during = d.tokenSteps.filter((n) => n > start && n <= h.stepNumber);
      const gaps = [start, ...during].slice(1).map((n, i) => n - [start, ...during][i]!);
      assert.ok(during.length >= prefillSteps - 1, `decoder got only ${during.length} tokens`);
      assert.ok(
        gaps.every((g) => g <= 2),
        `decoder token gaps ${gaps.join(",")} exceed 2 steps`,
      );
    }
  }
});

test("a decode step carries every running decoder, one token each", () => {
  const h = makeHarness({ maxNumSeqs: 4 });
  const seqs = Array.from({ length: 4 }, () => makeSeq({ prompt: 5, maxTokens: 3 }));
  for (const s of seqs) h.scheduler.add(s);
  assert.equal(h.step()?.kind, "prefill");
  const decode = h.step();
  assert.equal(decode?.kind, "decode");
  assert.deepEqual(
    idsOf(decode),
    seqs.map((s) => s.id),
  );
  assert.ok(decode!.works.every((w) => w.numTokens === 1));
});

test("admits in arrival order: a long prompt at the head is never overtaken by later short ones", () => {
  const h = makeHarness({ maxBatchedTokens: 64, maxNumSeqs: 8 });
  const arrivals = [3, 200, 5, 5, 70, 2, 9, 9, 9, 150, 4].map((prompt) => makeSeq({ prompt, maxTokens: 3 }));
  for (const s of arrivals) h.scheduler.add(s);
  const admitted: number[] = [];
  h.stepUntil(() => !h.scheduler.hasWork);
  for (const s of h.steps)
    for (const { seq } of s.works) if (!admitted.includes(seq.id)) admitted.push(seq.id);
  assert.deepEqual(
    admitted,
    arrivals.map((s) => s.id),
  );
});

test("a long prompt blocked on KV at the head starts before later short ones and completes in bounded steps", () => {
  // a holds 64 of 1024 tokens; long needs 1024, so it waits for a. Shorts (64 each) would fit but must wait.
  const h = makeHarness({ kvTokens: 1024, maxBatchedTokens: 128, maxNumSeqs: 8 });
  const a = makeSeq({ prompt: 10, maxTokens: 20 });
  h.scheduler.add(a);
  h.step();
  const long = makeSeq({ prompt: 900, maxTokens: 100 });
  const shorts = Array.from({ length: 5 }, () => makeSeq({ prompt: 5, maxTokens: 5 }));
  h.scheduler.add(long);
  for (const s of shorts) h.scheduler.add(s);
  const start = h.stepNumber;
  h.stepUntil(() => a.isFinished);
  assert.ok(
    shorts.every((s) => s.numComputedTokens === 0),
    "no short prompt overtook the blocked head",
  );
  h.stepUntil(() => long.isFinished);
  // a's 19 remaining decodes + 8 prefill chunks (~1 step each, nothing else runs) + 99 decodes, plus slack.
  assert.ok(h.stepNumber - start <= 19 + 8 + 99 + 4, `long took ${h.stepNumber - start} steps`);
  assert.ok(
    long.tokenSteps[0]! < Math.min(...shorts.map((s) => s.tokenSteps[0] ?? Number.POSITIVE_INFINITY)),
  );
  h.stepUntil(() => !h.scheduler.hasWork);
  assert.ok(shorts.every((s) => s.isFinished));
});

test("removing a waiting sequence drops it from the queue; it is never scheduled", () => {
  const h = makeHarness({ maxNumSeqs: 1 });
  const [a, b, c] = [makeSeq(), makeSeq(), makeSeq()];
  for (const s of [a!, b!, c!]) h.scheduler.add(s);
  h.step();
  h.scheduler.remove(b!);
  assert.equal(h.scheduler.numWaiting, 1);
  h.stepUntil(() => !h.scheduler.hasWork);
  assert.equal(b!.numComputedTokens, 0);
  assert.ok(a!.isFinished && c!.isFinished);
  assert.ok(!h.steps.some((s) => idsOf(s).includes(b!.id)));
});

test("removing a running sequence releases its KV reservation so a blocked sequence is admitted", () => {
  const h = makeHarness({ kvTokens: 128 });
  const big = makeSeq({ prompt: 100, maxTokens: 28 }); // reserves all 128
  const next = makeSeq({ prompt: 10, maxTokens: 2 });
  h.scheduler.add(big);
  h.scheduler.add(next);
  h.step();
  assert.equal(h.kv.usageFraction, 1);
  h.step();
  assert.equal(next.numComputedTokens, 0);
  h.scheduler.remove(big);
  assert.equal(h.kv.usageFraction, 0);
  assert.equal(h.scheduler.isRunning(big), false);
  assert.deepEqual(idsOf(h.step()), [next.id]);
  assert.equal(h.kv.numSequences, 1);
});

test("a full waiting queue answers overloaded with a retry hint and queues nothing", () => {
  const h = makeHarness({ maxWaiting: 2, maxNumSeqs: 1 });
  h.scheduler.add(makeSeq());
  h.scheduler.add(makeSeq());
  assert.throws(
    () => h.scheduler.add(makeSeq()),
    (error: unknown) =>
      error instanceof TaskmuxError &&
      error.type === "overloaded" &&
      typeof error.retryAfterSeconds === "number" &&
      error.retryAfterSeconds > 0 &&
      /2/.test(error.message),
  );
  assert.equal(h.scheduler.numWaiting, 2);
  h.step(); // admits one: the queue has room again
  h.scheduler.add(makeSeq());
  assert.equal(h.scheduler.numWaiting, 2);
});

test("hasWork is true exactly while something waits or a running sequence has tokens to compute", () => {
  const h = makeHarness();
  assert.equal(h.scheduler.hasWork, false);
  assert.equal(h.scheduler.schedule(), null);
  const s = makeSeq({ prompt: 3, maxTokens: 2 });
  h.scheduler.add(s);
  assert.equal(h.scheduler.hasWork, true);
  h.step();
  assert.equal(h.scheduler.numWaiting, 0);
  assert.equal(h.scheduler.hasWork, true, "a running sequence with a token to decode is work");
  h.step();
  assert.equal(s.isFinished, true);
  assert.equal(h.scheduler.hasWork, false);
  assert.equal(h.scheduler.numRunning, 0);
  assert.equal(h.scheduler.schedule(), null);
});
