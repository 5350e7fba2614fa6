import assert from "node:assert/strict";
import { test } from "node:test";
import { buildStep, type StepWork } from "../../src/engine/step-builder.ts";
import type { StepResult } from "../../src/model/contract.ts";
import type { LoadedModel } from "../../src/model/load-model.ts";
import { loadTestModel } from "../helpers/tiny-model.ts";

/**
 * A script of steps in which rows join, leave and read logits gives bit-identical results through the model
 * worker (messages, transferred buffers, fire-and-forget releases) and in process.
 */
async function runScript(model: LoadedModel): Promise<StepResult[]> {
  const { vocabSize: V, hiddenSize: D } = model.info.spec;
  const results: StepResult[] = [];
  const past = new Map<number, number>();
  const next = new Map<number, number>();
  const step = async (rows: { seqId: number; tokens?: number[]; reads?: boolean }[]) => {
    const works: StepWork[] = rows.map((r) => ({
      seqId: r.seqId,
      tokens: r.tokens ?? [next.get(r.seqId)!],
      pastLength: past.get(r.seqId) ?? 0,
      logits: "last",
      readsLogitValues: r.reads ?? false,
      loraSlot: 0,
      ia3Slot: 0,
      bottleneckSlot: 0,
    }));
    const result = await model.backend.forward(buildStep(works, V, D).batch);
    works.forEach((w, i) => {
      past.set(w.seqId, w.pastLength + w.tokens.length);
      next.set(w.seqId, result.greedyTokens[i]!);
    });
    results.push(result);
  };
  await step([{ seqId: 1, tokens: [5, 9, 14, 3, 7] }]);
  await step([{ seqId: 2, tokens: [11, 4, 8] }]);
  for (let i = 0; i < 3; i++) await step([{ seqId: 1 }, { seqId: 2, reads: i === 1 }]);
  model.backend.release([1]);
  await step([{ seqId: 2 }]);
  await step([{ seqId: 3, tokens: [6, 6, 2, 12] }]);
  for (let i = 0; i < 3; i++) await step([{ seqId: 3, reads: true }, { seqId: 2 }]);
  model.backend.release([2]);
  await step([{ seqId: 3 }]);
  return results;
}

test("the model worker equals the in-process runner, step for step", async () => {
  const inProcess = await loadTestModel(undefined, true);
  const worker = await loadTestModel(undefined, false);
  try {
    const expected = await runScript(inProcess);
    const actual = await runScript(worker);
    assert.equal(actual.length, expected.length);
    expected.forEach((e, i) => {
      assert.deepEqual([...actual[i]!.greedyTokens], [...e.greedyTokens], `step ${i} greedy tokens`);
      assert.deepEqual([...actual[i]!.finiteRows], [...e.finiteRows], `step ${i} finite rows`);
      assert.equal(actual[i]!.logits === null, e.logits === null, `step ${i} fetches logits alike`);
      if (e.logits) assert.deepEqual([...actual[i]!.logits!], [...e.logits], `step ${i} logits`);
    });
    assert.ok(
      expected.some((r) => r.logits !== null),
      "the script reads logits in some steps",
    );
  } finally {
    await inProcess.backend.dispose();
    await worker.backend.dispose();
  }
});
