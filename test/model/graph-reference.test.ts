import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { argmax } from "../../src/engine/sampler.ts";
import { buildStep, type StepWork } from "../../src/engine/step-builder.ts";
import { FULL_PEFT_LAYOUT, peftLayoutOf } from "../../src/model/contract.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { referenceForward } from "../../src/model/reference.ts";
import { logitsOf } from "../../src/model/runner.ts";
import { relativeError, runnerFor } from "../helpers/graph-runner.ts";
import { makeRandomModel } from "../helpers/random-model.ts";

const TOLERANCE = 1e-4; // relative, per logits row (max |diff| / max |reference|)

const CONFIGS: { name: string; spec: Partial<ModelSpec> }[] = [
  {
    name: "MHA with tied embeddings",
    spec: { numHeads: 4, numKvHeads: 4, headDim: 16, hiddenSize: 64, tieWordEmbeddings: true },
  },
  {
    name: "GQA, untied, llama3 rope scaling",
    spec: {
      numHeads: 4,
      numKvHeads: 2,
      headDim: 16,
      hiddenSize: 64,
      tieWordEmbeddings: false,
      ropeScaling: {
        type: "llama3",
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 32,
      },
    },
  },
  {
    name: "Qwen2-style q/k/v bias, one KV head",
    spec: {
      architecture: "Qwen2ForCausalLM",
      numHeads: 4,
      numKvHeads: 1,
      headDim: 16,
      hiddenSize: 64,
      qkvBias: true,
      ropeTheta: 1e6,
    },
  },
];

const blank = { loraSlot: 0, ia3Slot: 0, bottleneckSlot: 0 };

describe("graph logits equal the plain-TypeScript reference", () => {
  // --peft none builds the decoder without the If and the PEFT inputs: the same numbers must come out.
  const layouts = [
    { label: "", peft: FULL_PEFT_LAYOUT },
    { label: " (--peft none)", peft: peftLayoutOf([]) },
  ];
  for (const config of CONFIGS)
    for (const layout of layouts) {
      test(`${config.name}${layout.label}: batched prefill + 9 decode steps of changing rows within ${TOLERANCE}`, async (t) => {
        const { spec, weights } = makeRandomModel(config.spec, 11, { std: 0.08 });
        const runner = await runnerFor(spec, weights, { peft: layout.peft });
        const prompts = [
          [3, 17, 5, 9, 40, 2, 33],
          [8, 1, 60],
          [12, 4, 4, 51, 6],
        ];
        let worst = 0;
        // Prefill both prompts in one step, all positions' logits.
        const works: StepWork[] = prompts.map((tokens, i) => ({
          seqId: i + 1,
          tokens,
          pastLength: 0,
          logits: "all",
          ...blank,
        }));
        const built = buildStep(works, spec.vocabSize, spec.hiddenSize);
        const result = await runner.forward(built.batch);
        const V = spec.vocabSize;
        const sequences = prompts.map((p) => [...p]);
        built.owners.forEach((owner, r) => {
          const ref = referenceForward(spec, weights, { tokens: prompts[owner.work]! });
          const err = relativeError(
            logitsOf(result).subarray(r * V, (r + 1) * V),
            ref.subarray(owner.token * V, (owner.token + 1) * V),
          );
          worst = Math.max(worst, err);
        });
        for (let s = 0; s < prompts.length; s++) {
          const lastRow = built.owners.findLastIndex((o) => o.work === s);
          sequences[s]!.push(argmax(logitsOf(result).subarray(lastRow * V, (lastRow + 1) * V)));
        }
        // Rows sit out steps and come back in another order, so past lengths differ within a step and the
        // runner feeds rows in its KV mirror's slot order, not the step's (logits must still come back in the
        // step's order).
        const stepRows = [[0, 1, 2], [0], [2, 1], [1, 2, 0]];
        for (let step = 0; step < 9; step++) {
          const active = stepRows[step % stepRows.length]!;
          const decode = buildStep(
            active.map((i) => ({
              seqId: i + 1,
              tokens: [sequences[i]!.at(-1)!],
              pastLength: sequences[i]!.length - 1,
              logits: "last" as const,
              ...blank,
            })),
            spec.vocabSize,
            spec.hiddenSize,
          );
          const out = await runner.forward(decode.batch);
          active.forEach((i, r) => {
            const seq = sequences[i]!;
            const ref = referenceForward(spec, weights, { tokens: seq });
            const row = logitsOf(out).subarray(r * V, (r + 1) * V);
            worst = Math.max(worst, relativeError(row, ref.subarray((seq.length - 1) * V, seq.length * V)));
            assert.equal(out.greedyTokens[r], argmax(row), "greedy_token is the argmax of the row");
            assert.equal(out.finiteRows[r], 1, "a finite row is reported finite");
            seq.push(argmax(row));
          });
        }
        t.diagnostic(`largest relative error ${worst.toExponential(2)}`);
        assert.ok(worst < TOLERANCE, `relative error ${worst} exceeds ${TOLERANCE}`);
        await runner.dispose();
      });
    }

  test("a step whose rows only need their greedy token fetches no logits and returns the same tokens", async () => {
    const { spec, weights } = makeRandomModel(CONFIGS[1]!.spec, 5, { std: 0.08 });
    const runner = await runnerFor(spec, weights);
    const works = (reads: boolean): StepWork[] =>
      [
        [5, 9, 1],
        [7, 7, 30, 2],
      ].map((tokens, i) => ({
        seqId: i + (reads ? 1 : 11),
        tokens,
        pastLength: 0,
        logits: "last",
        readsLogitValues: reads,
        ...blank,
      }));
    const full = await runner.forward(buildStep(works(true), spec.vocabSize, spec.hiddenSize).batch);
    const greedyOnly = buildStep(works(false), spec.vocabSize, spec.hiddenSize).batch;
    assert.equal(greedyOnly.fetchLogits, false, "no work reads logit values");
    const lean = await runner.forward(greedyOnly);
    assert.equal(lean.logits, null, "logits were not fetched");
    assert.deepEqual([...lean.greedyTokens], [...full.greedyTokens], "same greedy tokens");
    assert.deepEqual([...lean.finiteRows], [1, 1], "rows reported finite");
    // A prompt chunk that is not the last wants no logits: no per-row outputs are fetched at all.
    const chunk = buildStep(
      [{ seqId: 21, tokens: [3, 4, 5], pastLength: 0, logits: "none", ...blank }],
      spec.vocabSize,
      spec.hiddenSize,
    ).batch;
    const none = await runner.forward(chunk);
    assert.equal(none.numLogitRows, 0, "no logits rows");
    assert.equal(none.greedyTokens.length + none.finiteRows.length, 0, "no per-row outputs");
    const V = spec.vocabSize;
    assert.deepEqual(
      [...full.greedyTokens],
      [0, 1].map((r) => argmax(logitsOf(full).subarray(r * V, (r + 1) * V))),
      "greedy_token is the argmax of each fetched row",
    );
    await runner.dispose();
  });

  test("manual rope (plain ops) equals the contrib RotaryEmbedding path", async () => {
    const { spec, weights } = makeRandomModel({ headDim: 8 }, 3, { std: 0.08 });
    const tokens = [4, 9, 13, 2, 7];
    const outs = [];
    for (const rope of ["manual", "contrib"] as const) {
      const runner = await runnerFor(spec, weights, { rope });
      const step = buildStep(
        [{ seqId: 1, tokens, pastLength: 0, logits: "all", ...blank }],
        spec.vocabSize,
        spec.hiddenSize,
      );
      outs.push((await runner.forward(step.batch)).logits);
      await runner.dispose();
    }
    const ref = referenceForward(spec, weights, { tokens });
    assert.ok(relativeError(outs[0]!, ref) < TOLERANCE);
    assert.ok(relativeError(outs[1]!, ref) < TOLERANCE);
  });
});
