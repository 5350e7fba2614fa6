import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { buildStep, type StepWork } from "../../src/engine/step-builder.ts";
import { buildOrReuseGraph } from "../../src/model/builder/build-cache.ts";
import type { Checkpoint } from "../../src/model/checkpoint.ts";
import { FULL_PEFT_LAYOUT } from "../../src/model/contract.ts";
import { referenceForward } from "../../src/model/reference.ts";
import { ModelRunner } from "../../src/model/runner.ts";
import { makeRandomModel } from "../helpers/random-model.ts";

test("smoke: graph matches reference for one sequence", async () => {
  const { spec, weights } = makeRandomModel({ hiddenSize: 64, numHeads: 4, numKvHeads: 2, headDim: 16 }, 1);
  const dir = mkdtempSync(join(tmpdir(), "tmx-"));
  const ckpt = { spec, weights, contentHash: "x", dir } as unknown as Checkpoint;
  for (const rope of ["manual", "contrib"] as const) {
    const built = buildOrReuseGraph(ckpt, { peft: FULL_PEFT_LAYOUT, rope }, join(dir, rope));
    const runner = await ModelRunner.create({
      modelPath: built.modelPath,
      spec,
      peft: FULL_PEFT_LAYOUT,
      threads: 1,
      pools: { loraSlots: 2, maxLoraRank: 4, ia3Slots: 2, bottleneckSlots: 2, maxBottleneckSize: 4 },
    });
    const tokens = [1, 5, 9, 3, 7, 2];
    const ref = referenceForward(spec, weights, { tokens });
    const work: StepWork = {
      seqId: 1,
      tokens: tokens.slice(0, 4),
      pastLength: 0,
      logits: "all",
      loraSlot: 0,
      ia3Slot: 0,
      bottleneckSlot: 0,
    };
    const s1 = buildStep([work], spec.vocabSize, spec.hiddenSize);
    const r1 = await runner.forward(s1.batch);
    let maxErr = 0;
    for (let i = 0; i < r1.logits.length; i++) maxErr = Math.max(maxErr, Math.abs(r1.logits[i]! - ref[i]!));
    const s2 = buildStep(
      [{ ...work, tokens: [tokens[4]!], pastLength: 4, logits: "last" }],
      spec.vocabSize,
      spec.hiddenSize,
    );
    const r2 = await runner.forward(s2.batch);
    for (let i = 0; i < spec.vocabSize; i++)
      maxErr = Math.max(maxErr, Math.abs(r2.logits[i]! - ref[4 * spec.vocabSize + i]!));
    console.log(rope, "maxErr", maxErr);
    assert.ok(maxErr < 1e-4);
    await runner.dispose();
  }
  rmSync(dir, { recursive: true, force: true });
});
