/**
 * Accelerator check: the stories260k golden output on the device named by TASKMUX_TEST_DEVICE
 * (webgpu or cuda). Skipped, saying why, on machines without one (CI and developers' machines here).
 */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { argmax } from "../../src/engine/sampler.ts";
import { buildStep } from "../../src/engine/step-builder.ts";
import { buildOrReuseGraph } from "../../src/model/builder/build-cache.ts";
import { inspectCheckpoint } from "../../src/model/checkpoint.ts";
import { FULL_PEFT_LAYOUT } from "../../src/model/contract.ts";
import {
  candidateDevices,
  type Device,
  executionProviders,
  machineFacts,
  probeDevice,
} from "../../src/model/device.ts";
import { logitsOf, ModelRunner } from "../../src/model/runner.ts";
import { TEST_CACHE_DIR } from "../helpers/tiny-model.ts";

const STORIES = fileURLToPath(new URL("../../../shared/models/stories260k/", import.meta.url));
const wanted = process.env.TASKMUX_TEST_DEVICE as Device | undefined;

test("stories260k greedy output on the accelerator equals the recorded one", async (t) => {
  if (!wanted || wanted === "cpu")
    return t.skip("no accelerator requested (set TASKMUX_TEST_DEVICE=webgpu|cuda)");
  if (!existsSync(STORIES)) return t.skip(`${STORIES} is absent`);
  const facts = machineFacts();
  const probe = probeDevice(wanted, facts);
  if (!probe.ready) return t.skip(`--device ${wanted} is not usable here: ${probe.missing.join("; ")}`);
  assert.deepEqual(candidateDevices(wanted, facts), [wanted]);
  const info = inspectCheckpoint(STORIES);
  const built = buildOrReuseGraph(info, { peft: FULL_PEFT_LAYOUT, rope: "contrib" }, TEST_CACHE_DIR);
  const runner = await ModelRunner.create({
    modelPath: built.modelPath,
    spec: info.spec,
    peft: FULL_PEFT_LAYOUT,
    threads: 0,
    executionProviders: executionProviders(wanted),
    pools: { loraSlots: 1, maxLoraRank: 4, ia3Slots: 1, bottleneckSlots: 1, maxBottleneckSize: 4 },
  });
  const expected = JSON.parse(readFileSync(`${STORIES}expected.json`, "utf8")) as {
    cases: { prompt_ids: number[]; completion_ids: number[] }[];
  };
  const V = info.spec.vocabSize;
  const blank = { loraSlot: 0, ia3Slot: 0, bottleneckSlot: 0 };
  for (const [i, c] of expected.cases.entries()) {
    const tokens = [...c.prompt_ids];
    let step = buildStep(
      [{ seqId: i + 1, tokens, pastLength: 0, logits: "last", ...blank }],
      V,
      info.spec.hiddenSize,
    );
    for (let n = 0; n < c.completion_ids.length; n++) {
      const next = argmax(logitsOf(await runner.forward(step.batch)).subarray(0, V));
      tokens.push(next);
      step = buildStep(
        [{ seqId: i + 1, tokens: [next], pastLength: tokens.length - 1, logits: "last", ...blank }],
        V,
        info.spec.hiddenSize,
      );
    }
    assert.deepEqual(tokens.slice(c.prompt_ids.length), c.completion_ids);
  }
  await runner.dispose();
});
