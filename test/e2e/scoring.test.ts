/**
 * lm-evaluation-harness's scoring request (`echo` + `logprobs` + `max_tokens: 0`) through the HTTP layer and
 * the real engine equals the plain-TypeScript reference's log-softmax within 1e-4.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createApp } from "../../src/http/app.ts";
import { loadCheckpoint } from "../../src/model/checkpoint.ts";
import { logSoftmax, referenceForward } from "../../src/model/reference.ts";
import { madeModelDir, startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const TOLERANCE = 1e-4;
let stack: TestStack;

before(async () => {
  stack = await startTestStack();
});
after(async () => {
  await stack.dispose();
});

test("echo + logprobs + max_tokens 0 returns the reference's prompt logprobs (first token null)", async () => {
  const app = createApp({ service: stack.service });
  const prompt = "The quick brown fox jumps over the lazy dog, then sleeps.";
  const res = await app.request("/v1/completions", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ prompt, max_tokens: 0, echo: true, logprobs: 1 }),
  });
  assert.equal(res.status, 200);
  const body = (await res.json()) as {
    choices: {
      text: string;
      logprobs: { tokens: string[]; token_logprobs: (number | null)[]; top_logprobs: unknown[] };
    }[];
  };
  const choice = body.choices[0]!;
  assert.equal(choice.text, prompt);
  const ids = stack.model.tokenizer.encode(prompt);
  const { spec, weights } = loadCheckpoint(madeModelDir());
  const logits = referenceForward(spec, weights, { tokens: ids });
  const served = choice.logprobs.token_logprobs;
  assert.equal(served.length, ids.length);
  assert.equal(served[0], null);
  let worst = 0;
  for (let i = 1; i < ids.length; i++) {
    const lsm = logSoftmax(logits.subarray((i - 1) * spec.vocabSize, i * spec.vocabSize));
    worst = Math.max(worst, Math.abs(lsm[ids[i]!]! - served[i]!));
  }
  assert.ok(worst < TOLERANCE, `largest |served - reference| = ${worst}`);
  assert.equal(choice.logprobs.tokens.join(""), prompt, "token strings concatenate to the echoed text");
});
