/**
 * `--weights fp32|fp16|int8|int4` (GraphOptions.weights) on a small random model, prefill + decode through the
 * real graph and runner:
 *
 * 1. Each format equals the plain reference run on the weights that format computes with (`effectiveWeights`:
 *    the fp16 or block-quantised round trip of every projection and of the LM head): this checks the packing,
 *    the fused qkv / gate_up rows, the tied head's own quantised copy and the fp32 embedding Gather. Tolerance
 *    (max |Δ| / max |logit| per row): fp32 and fp16 1e-4; int8 and int4 5e-2, because MatMulNBits at
 *    accuracy_level 4 also quantises the activations to int8 per block.
 * 2. Drift against the fp32 model (the lossy part, what docs/weight-formats.md reports on real shapes): mean
 *    |Δ logprob| of the fp32 greedy token over all positions stays under FP32_DRIFT[format].
 * 3. PEFT paths keep working on every format: a LoRA on q, v, o, gate, down (rank 4, slot 1) changes the logits by
 *    the reference's delta on the same effective weights, and IA3 + a bottleneck adapter + soft-prompt rows all
 *    together match the reference, within the format's tolerance.
 * 4. The If that skips the PEFT paths in base-only steps: a layout with LoRA on q and v only, and one with no PEFT
 *    paths at all, give the reference's logits (and the base branch equals the graph without PEFT paths).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { argmax } from "../../src/engine/sampler.ts";
import { buildStep, type StepWork } from "../../src/engine/step-builder.ts";
import { effectiveWeights, WEIGHT_FORMATS, type WeightFormat } from "../../src/model/builder/quantize.ts";
import type { BaseWeights } from "../../src/model/checkpoint.ts";
import {
  type BottleneckModuleWeights,
  type LoraModuleWeights,
  moduleKey,
  type Projection,
  projectionDims,
  type SequenceAdapterWeights,
} from "../../src/model/contract.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { logSoftmax, type ReferenceInput, referenceForward } from "../../src/model/reference.ts";
import { logitsOf, type ModelRunner } from "../../src/model/runner.ts";
import { relativeError, runnerFor } from "../helpers/graph-runner.ts";
import { makeRandomModel, makeRng } from "../helpers/random-model.ts";

const KERNEL_TOLERANCE: Record<WeightFormat, number> = { fp32: 1e-4, fp16: 1e-4, int8: 5e-2, int4: 5e-2 };
const FP32_DRIFT: Record<WeightFormat, number> = { fp32: 1e-5, fp16: 2e-3, int8: 3e-2, int4: 0.25 };
/** The LoRA delta is a difference of two runs, each off by the kernel tolerance: relative to the (smaller) delta. */
const DELTA_TOLERANCE: Record<WeightFormat, number> = { fp32: 1e-4, fp16: 1e-4, int8: 0.1, int4: 0.1 };

// Tied embeddings (the head's own quantised copy), an FF width that is not a multiple of the 32-block (80).
const SPEC: Partial<ModelSpec> = {
  numHeads: 4,
  numKvHeads: 2,
  headDim: 16,
  hiddenSize: 64,
  intermediateSize: 80,
  vocabSize: 96,
  tieWordEmbeddings: true,
};
const PROMPT = [3, 17, 5, 9, 40, 2, 33, 11, 60, 7];
const CONTINUATION = [21, 90, 4, 55];
const blank = { loraSlot: 0, ia3Slot: 0, bottleneckSlot: 0 };

/** Logits for every position of PROMPT + CONTINUATION: one prefill, then teacher-forced decode steps. */
async function graphLogits(
  runner: ModelRunner,
  spec: ModelSpec,
  slots: Partial<StepWork> = {},
  tokens = [...PROMPT, ...CONTINUATION],
  promptLength = PROMPT.length,
): Promise<Float32Array> {
  const V = spec.vocabSize;
  const out = new Float32Array(tokens.length * V);
  const seqId = Math.floor(Math.random() * 1e9);
  const work = (t: number[], past: number, logits: "all" | "last"): StepWork => ({
    seqId,
    tokens: t,
    pastLength: past,
    logits,
    ...blank,
    ...slots,
  });
  const pre = await runner.forward(
    buildStep([work(tokens.slice(0, promptLength), 0, "all")], V, spec.hiddenSize).batch,
  );
  out.set(logitsOf(pre), 0);
  for (let p = promptLength; p < tokens.length; p++) {
    const step = await runner.forward(buildStep([work([tokens[p]!], p, "last")], V, spec.hiddenSize).batch);
    out.set(logitsOf(step), p * V);
  }
  runner.release([seqId]);
  return out;
}

function worstRowError(actual: Float32Array, expected: Float32Array, V: number): number {
  let worst = 0;
  for (let r = 0; r < actual.length / V; r++)
    worst = Math.max(
      worst,
      relativeError(actual.subarray(r * V, (r + 1) * V), expected.subarray(r * V, (r + 1) * V)),
    );
  return worst;
}

function loraAdapter(spec: ModelSpec, seed: number): SequenceAdapterWeights {
  const rng = makeRng(seed);
  const lora = new Map<string, LoraModuleWeights>();
  const rank = 4;
  for (let l = 0; l < spec.numLayers; l++) {
    for (const m of ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"] as Projection[]) {
      const { inDim, outDim } = projectionDims(spec, m);
      lora.set(moduleKey(l, m), {
        rank,
        a: rng.normals(rank * inDim, 0.2),
        b: rng.normals(outDim * rank, 0.2),
      });
    }
  }
  return { lora };
}

function ia3AndBottleneck(spec: ModelSpec, seed: number): SequenceAdapterWeights {
  const rng = makeRng(seed);
  const d = spec.hiddenSize;
  const ia3 = new Map<string, Float32Array>();
  const bottleneck = new Map<string, BottleneckModuleWeights>();
  const size = 4;
  for (let l = 0; l < spec.numLayers; l++) {
    for (const m of ["k_proj", "v_proj", "down_proj"] as Projection[]) {
      const dim = m === "down_proj" ? spec.intermediateSize : spec.numKvHeads * spec.headDim;
      ia3.set(moduleKey(l, m), rng.normals(dim, 0.3, 1));
    }
    for (const p of ["attn", "mlp"]) {
      bottleneck.set(moduleKey(l, p), {
        size,
        down: rng.normals(size * d, 0.2),
        downBias: rng.normals(size, 0.1),
        up: rng.normals(d * size, 0.2),
        upBias: rng.normals(d, 0.05),
      });
    }
  }
  return { ia3, bottleneck };
}

describe("weight formats: the graph against the reference on the weights each format computes with", () => {
  let spec: ModelSpec;
  let weights: BaseWeights;
  let fp32Reference: Float32Array;
  const runners = new Map<WeightFormat, ModelRunner>();

  before(async () => {
    ({ spec, weights } = makeRandomModel(SPEC, 21, { std: 0.08 }));
    fp32Reference = referenceForward(spec, weights, { tokens: [...PROMPT, ...CONTINUATION] });
    for (const f of WEIGHT_FORMATS) runners.set(f, await runnerFor(spec, weights, { weights: f }));
  });
  after(async () => {
    for (const r of runners.values()) await r.dispose();
  });

  for (const format of WEIGHT_FORMATS) {
    test(`${format}: equals the reference on its effective weights, drift from fp32 within ${FP32_DRIFT[format]}`, async (t) => {
      const V = spec.vocabSize;
      const logits = await graphLogits(runners.get(format)!, spec);
      const eff = referenceForward(spec, effectiveWeights(weights, format), {
        tokens: [...PROMPT, ...CONTINUATION],
      });
      const kernel = worstRowError(logits, eff, V);
      let drift = 0;
      const rows = logits.length / V;
      for (let r = 0; r < rows; r++) {
        const ref = fp32Reference.subarray(r * V, (r + 1) * V);
        const greedy = argmax(ref);
        drift += Math.abs(
          logSoftmax(logits.subarray(r * V, (r + 1) * V))[greedy]! - logSoftmax(ref)[greedy]!,
        );
      }
      drift /= rows;
      t.diagnostic(
        `vs effective weights ${kernel.toExponential(2)}; mean |Δ logprob| vs fp32 ${drift.toExponential(2)}`,
      );
      assert.ok(
        kernel < KERNEL_TOLERANCE[format],
        `${format}: ${kernel} from the reference on its own weights`,
      );
      assert.ok(drift < FP32_DRIFT[format], `${format}: drift ${drift} from fp32`);
    });
  }

  for (const format of WEIGHT_FORMATS) {
    test(`${format}: a LoRA changes the logits by the reference's delta`, async (t) => {
      const V = spec.vocabSize;
      const runner = runners.get(format)!;
      const adapters = loraAdapter(spec, 31);
      await runner.writeAdapterSlot("lora", 1, adapters);
      const tokens = [...PROMPT, ...CONTINUATION];
      const withLora = await graphLogits(runner, spec, { loraSlot: 1 });
      const base = await graphLogits(runner, spec);
      await runner.clearAdapterSlot("lora", 1);
      const eff = effectiveWeights(weights, format);
      const refLora = referenceForward(spec, eff, { tokens, adapters });
      const refBase = referenceForward(spec, eff, { tokens });
      const delta = withLora.map((v, i) => v - base[i]!);
      const refDelta = refLora.map((v, i) => v - refBase[i]!);
      const deltaErr = worstRowError(delta, refDelta, V);
      const fullErr = worstRowError(withLora, refLora, V);
      t.diagnostic(`delta ${deltaErr.toExponential(2)}, logits ${fullErr.toExponential(2)}`);
      assert.ok(
        refDelta.some((v) => Math.abs(v) > 0.05),
        "the adapter must matter",
      );
      assert.ok(fullErr < KERNEL_TOLERANCE[format], `${format}: LoRA logits off by ${fullErr}`);
      assert.ok(deltaErr < DELTA_TOLERANCE[format], `${format}: LoRA delta off by ${deltaErr}`);
    });
  }

  for (const format of WEIGHT_FORMATS) {
    test(`${format}: IA3 + bottleneck adapter + soft-prompt rows together equal the reference`, async (t) => {
      const V = spec.vocabSize;
      const runner = runners.get(format)!;
      const adapters = ia3AndBottleneck(spec, 41);
      await runner.writeAdapterSlot("ia3", 2, adapters);
      await runner.writeAdapterSlot("bottleneck", 1, adapters);
      const virtualTable = makeRng(51).normals(3 * spec.hiddenSize, 0.5);
      // Three virtual tokens (ids >= V address virtualTable rows) before the prompt.
      const tokens = [V, V + 1, V + 2, ...PROMPT, ...CONTINUATION];
      const logits = await graphLogits(
        runner,
        spec,
        { ia3Slot: 2, bottleneckSlot: 1, virtualTable },
        tokens,
        3 + PROMPT.length,
      );
      await runner.clearAdapterSlot("ia3", 2);
      await runner.clearAdapterSlot("bottleneck", 1);
      const input: ReferenceInput = { tokens, adapters, virtualEmbeddings: virtualTable };
      const ref = referenceForward(spec, effectiveWeights(weights, format), input);
      const err = worstRowError(logits, ref, V);
      t.diagnostic(`relative error ${err.toExponential(2)}`);
      assert.ok(err < KERNEL_TOLERANCE[format], `${format}: ${err}`);
    });
  }
});

describe("weight formats: untied head", () => {
  for (const format of ["fp16", "int4"] as const) {
    test(`${format}: a separate lm_head is stored and multiplied in the format`, async () => {
      const { spec, weights } = makeRandomModel({ ...SPEC, tieWordEmbeddings: false }, 23, { std: 0.08 });
      const runner = await runnerFor(spec, weights, { weights: format });
      const logits = await graphLogits(runner, spec);
      await runner.dispose();
      const ref = referenceForward(spec, effectiveWeights(weights, format), {
        tokens: [...PROMPT, ...CONTINUATION],
      });
      const err = worstRowError(logits, ref, spec.vocabSize);
      assert.ok(err < KERNEL_TOLERANCE[format], `${format}: ${err}`);
    });
  }
});

describe("weight formats: partial PEFT layouts (the base-only branch and a q/v-only LoRA branch)", () => {
  test("int4 with LoRA on q and v only, and with no PEFT paths at all", async () => {
    const { spec, weights } = makeRandomModel(SPEC, 25, { std: 0.08 });
    const tokens = [...PROMPT, ...CONTINUATION];
    const eff = effectiveWeights(weights, "int4");
    const qv = await runnerFor(spec, weights, {
      weights: "int4",
      peft: { loraTargets: ["q_proj", "v_proj"], ia3Targets: [], bottleneck: false },
    });
    const full = loraAdapter(spec, 33).lora!;
    const adapters: SequenceAdapterWeights = {
      lora: new Map([...full].filter(([key]) => key.endsWith("q_proj") || key.endsWith("v_proj"))),
    };
    await qv.writeAdapterSlot("lora", 1, adapters);
    const withLora = await graphLogits(qv, spec, { loraSlot: 1 });
    const base = await graphLogits(qv, spec);
    await qv.dispose();
    const none = await runnerFor(spec, weights, {
      weights: "int4",
      peft: { loraTargets: [], ia3Targets: [], bottleneck: false },
    });
    const plain = await graphLogits(none, spec);
    await none.dispose();
    const V = spec.vocabSize;
    assert.ok(
      worstRowError(withLora, referenceForward(spec, eff, { tokens, adapters }), V) < KERNEL_TOLERANCE.int4,
    );
    assert.ok(worstRowError(base, referenceForward(spec, eff, { tokens }), V) < KERNEL_TOLERANCE.int4);
    assert.ok(worstRowError(plain, base, V) < 1e-5, "the layout without PEFT paths equals the base branch");
  });
});

describe("weight formats: the quantisation block size", () => {
  test("int4 at block 128 equals the reference on its block-128 weights, not on block 32's", async () => {
    const { spec, weights } = makeRandomModel(SPEC, 27, { std: 0.08 });
    const tokens = [...PROMPT, ...CONTINUATION];
    const runner = await runnerFor(spec, weights, { weights: "int4", quantBlockSize: 128 });
    const logits = await graphLogits(runner, spec);
    await runner.dispose();
    const V = spec.vocabSize;
    const own = worstRowError(
      logits,
      referenceForward(spec, effectiveWeights(weights, "int4", 128), { tokens }),
      V,
    );
    const block32 = worstRowError(
      logits,
      referenceForward(spec, effectiveWeights(weights, "int4"), { tokens }),
      V,
    );
    assert.ok(own < KERNEL_TOLERANCE.int4, `block 128 against its own effective weights: ${own}`);
    assert.ok(block32 > 2 * own, `block 128 is not block 32 in disguise: ${block32} against ${own}`);
  });
});
