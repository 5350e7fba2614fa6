/**
 * Real third-party checkpoints from ../shared/models/<name>/ (when present): the full stack (tokenizer,
 * graph, engine) reproduces the greedy continuation and log-probabilities recorded in expected.json.
 */
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import type { EngineEvent } from "../../src/engine/events.ts";
import { startTestStack } from "../helpers/tiny-model.ts";

const SHARED_MODELS = fileURLToPath(new URL("../../../shared/models/", import.meta.url));
const LOGPROB_TOLERANCE = 1e-4;

interface ExpectedCase {
  prompt: string;
  prompt_ids: number[];
  max_tokens: number;
  completion_ids: number[];
  completion_text: string;
  completion_logprobs: number[];
  prompt_logprobs: (number | null)[];
}

const names = existsSync(SHARED_MODELS)
  ? readdirSync(SHARED_MODELS).filter((n) => existsSync(join(SHARED_MODELS, n, "expected.json")))
  : [];

describe("real checkpoints reproduce their recorded greedy output", () => {
  if (names.length === 0) {
    test("no checkpoints", (t) => t.skip(`${SHARED_MODELS} is absent: nothing to check`));
    return;
  }
  for (const name of names) {
    test(name, async (t) => {
      const dir = join(SHARED_MODELS, name);
      const expected = JSON.parse(readFileSync(join(dir, "expected.json"), "utf8")) as {
        cases: ExpectedCase[];
      };
      const stack = await startTestStack({ dir });
      let worst = 0;
      try {
        for (const c of expected.cases) {
          const handle = await stack.service.generate({
            requestId: name,
            prompt: { kind: "text", text: c.prompt },
            task: null,
            params: { temperature: 0, maxTokens: c.max_tokens, logprobs: 0, promptLogprobs: 0 },
          });
          assert.deepEqual(handle.promptTokens, c.prompt_ids, `tokenizer: ${JSON.stringify(c.prompt)}`);
          const ids: number[] = [];
          const logprobs: number[] = [];
          let text = "";
          let promptScores: (number | null)[] = [];
          for await (const e of handle.events as AsyncIterable<EngineEvent>) {
            if (e.type === "token") {
              ids.push(e.tokenId);
              logprobs.push(e.logprob!);
              text += e.text;
            } else if (e.type === "prompt_logprobs") promptScores = e.entries.map((x) => x.logprob);
            else if (e.type === "finished") text += e.text;
            else assert.fail(`error event: ${e.error.message}`);
          }
          assert.deepEqual(ids, c.completion_ids, `greedy ids for ${JSON.stringify(c.prompt)}`);
          // expected.json decodes the completion on its own (SentencePiece drops a leading space there); a
          // completion API continues the prompt, so the separating space stays (as vLLM returns it).
          assert.equal(text.trimStart(), c.completion_text.trimStart());
          c.completion_logprobs.forEach((lp, i) => {
            worst = Math.max(worst, Math.abs(lp - logprobs[i]!));
          });
          assert.equal(promptScores[0], null);
          c.prompt_logprobs.forEach((lp, i) => {
            if (lp !== null) worst = Math.max(worst, Math.abs(lp - promptScores[i]!));
          });
        }
        t.diagnostic(`largest |logprob - recorded| ${worst.toExponential(2)}`);
        assert.ok(worst < LOGPROB_TOLERANCE, `logprob drift ${worst} exceeds ${LOGPROB_TOLERANCE}`);
      } finally {
        await stack.dispose();
      }
    });
  }
});
