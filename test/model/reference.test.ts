/** Tests for the float64 reference forward pass: a real checkpoint's recorded output, and adapter identities. */
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import type { BaseWeights, LayerWeights } from "../../src/model/checkpoint.ts";
import { loadCheckpoint } from "../../src/model/checkpoint.ts";
import {
  type BottleneckModuleWeights,
  type LoraModuleWeights,
  moduleKey,
  type Projection,
  projectionDims,
} from "../../src/model/contract.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { logSoftmax, referenceForward, referenceRun } from "../../src/model/reference.ts";
import { makeRandomModel, makeRng, type Rng } from "../helpers/random-model.ts";

const STORIES = fileURLToPath(new URL("../../../shared/models/stories260k/", import.meta.url));

interface ExpectedCase {
  prompt: string;
  prompt_ids: number[];
  completion_ids: number[];
  completion_logprobs: number[];
  prompt_logprobs?: (number | null)[];
}

const maxAbsDiff = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
};
const maxAbs = (a: ArrayLike<number>): number => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);
const relDiff = (a: ArrayLike<number>, b: ArrayLike<number>): number => maxAbsDiff(a, b) / maxAbs(b);
const row = (logits: Float32Array, t: number, vocab: number) => logits.subarray(t * vocab, (t + 1) * vocab);
const allFinite = (a: Float32Array) => a.every((v) => Number.isFinite(v));
const randomTokens = (rng: Rng, n: number, vocab: number) => Array.from({ length: n }, () => rng.int(vocab));

function argmaxAndMargin(r: Float32Array): { index: number; margin: number } {
  let index = 0;
  for (let i = 1; i < r.length; i++) if (r[i]! > r[index]!) index = i;
  let second = Number.NEGATIVE_INFINITY;
  for (let i = 0; i < r.length; i++) if (i !== index) second = Math.max(second, r[i]!);
  return { index, margin: r[index]! - second };
}

/** A deep copy of the float arrays, so a test can merge adapters into weights without touching the original. */
function cloneWeights(w: BaseWeights): BaseWeights {
  const copy = (a: Float32Array | null) => (a ? a.slice() : null);
  const layers = w.layers.map((l) => {
    const out = {} as Record<string, Float32Array | null>;
    for (const [k, v] of Object.entries(l)) out[k] = copy(v);
    return out as unknown as LayerWeights;
  });
  return { embed: w.embed.slice(), layers, finalNorm: w.finalNorm.slice(), lmHead: w.lmHead.slice() };
}

const WEIGHT_FIELD: Record<
  Projection,
  "qProj" | "kProj" | "vProj" | "oProj" | "gateProj" | "upProj" | "downProj"
> = {
  q_proj: "qProj",
  k_proj: "kProj",
  v_proj: "vProj",
  o_proj: "oProj",
  gate_proj: "gateProj",
  up_proj: "upProj",
  down_proj: "downProj",
};

function randomLora(rng: Rng, spec: ModelSpec, m: Projection, rank: number): LoraModuleWeights {
  const { inDim, outDim } = projectionDims(spec, m);
  return { rank, a: rng.normals(rank * inDim, 0.2), b: rng.normals(outDim * rank, 0.2) };
}

/** W += b·a, in place (W [out, in], a [r, in], b [out, r]). */
function mergeLora(w: Float32Array, lora: LoraModuleWeights, outDim: number, inDim: number): void {
  for (let o = 0; o < outDim; o++) {
    for (let i = 0; i < inDim; i++) {
      let acc = w[o * inDim + i]!;
      for (let r = 0; r < lora.rank; r++) acc += lora.b[o * lora.rank + r]! * lora.a[r * inDim + i]!;
      w[o * inDim + i] = acc;
    }
  }
}

test("stories260k: reference reproduces the recorded greedy tokens and log-probs", (t) => {
  if (!existsSync(join(STORIES, "model.safetensors"))) {
    t.skip("../shared/models/stories260k absent");
    return;
  }
  const expected = JSON.parse(readFileSync(join(STORIES, "expected.json"), "utf8")) as {
    cases: ExpectedCase[];
  };
  const { spec, weights } = loadCheckpoint(STORIES);
  let maxCompletion = 0;
  let maxPrompt = 0;
  let minMargin = Number.POSITIVE_INFINITY;
  for (const c of expected.cases) {
    const tokens = [...c.prompt_ids, ...c.completion_ids];
    const logits = referenceForward(spec, weights, { tokens });
    assert.equal(logits.length, tokens.length * spec.vocabSize);
    c.completion_ids.forEach((id, j) => {
      const r = row(logits, c.prompt_ids.length - 1 + j, spec.vocabSize);
      const { index, margin } = argmaxAndMargin(r);
      minMargin = Math.min(minMargin, margin);
      assert.equal(index, id, `${JSON.stringify(c.prompt)}: greedy token ${j}`);
      const diff = Math.abs(logSoftmax(r)[id]! - c.completion_logprobs[j]!);
      maxCompletion = Math.max(maxCompletion, diff);
      assert.ok(diff < 1e-4, `${JSON.stringify(c.prompt)}: completion logprob ${j} off by ${diff}`);
    });
    (c.prompt_logprobs ?? []).forEach((lp, i) => {
      if (lp === null) return; // the first token has no context to be scored against
      const diff = Math.abs(logSoftmax(row(logits, i - 1, spec.vocabSize))[c.prompt_ids[i]!]! - lp);
      maxPrompt = Math.max(maxPrompt, diff);
      assert.ok(diff < 1e-4, `${JSON.stringify(c.prompt)}: prompt logprob ${i} off by ${diff}`);
    });
  }
  t.diagnostic(
    `max |Δlogprob| completion ${maxCompletion.toExponential(2)}, prompt ${maxPrompt.toExponential(2)}; ` +
      `smallest greedy top-1 margin ${minMargin.toFixed(4)}`,
  );
});

test("LoRA on several projections equals the merged weights W + b·a", (t) => {
  const { spec, weights } = makeRandomModel({ numLayers: 2 }, 7, { std: 0.2 });
  const rng = makeRng(99);
  const targets: [number, Projection][] = [
    [0, "q_proj"],
    [0, "v_proj"],
    [0, "o_proj"],
    [0, "down_proj"],
    [1, "k_proj"],
    [1, "gate_proj"],
    [1, "up_proj"],
  ];
  const lora = new Map<string, LoraModuleWeights>();
  const merged = cloneWeights(weights);
  targets.forEach(([layer, m], i) => {
    const module = randomLora(rng, spec, m, 1 + (i % 3));
    lora.set(moduleKey(layer, m), module);
    const { inDim, outDim } = projectionDims(spec, m);
    mergeLora(merged.layers[layer]![WEIGHT_FIELD[m]], module, outDim, inDim);
  });
  const tokens = randomTokens(rng, 9, spec.vocabSize);
  const withLora = referenceForward(spec, weights, { tokens, adapters: { lora } });
  const mergedLogits = referenceForward(spec, merged, { tokens });
  const base = referenceForward(spec, weights, { tokens });
  const rel = relDiff(withLora, mergedLogits);
  t.diagnostic(
    `LoRA vs merged relative diff ${rel.toExponential(2)}; LoRA moved logits by ${relDiff(withLora, base).toFixed(3)}`,
  );
  assert.ok(rel < 1e-5, `relative diff ${rel}`);
  assert.ok(relDiff(withLora, base) > 1e-2, "the LoRA must actually change the output");
});

test("IA3: all-ones is the identity; output/input scaling (with LoRA) equals scaled weights", (t) => {
  const { spec, weights } = makeRandomModel({ qkvBias: true }, 3, { std: 0.2 });
  const rng = makeRng(5);
  const tokens = randomTokens(rng, 8, spec.vocabSize);
  const base = referenceForward(spec, weights, { tokens });
  const ones = new Map<string, Float32Array>();
  for (const m of ["q_proj", "v_proj", "up_proj", "down_proj"] as Projection[]) {
    const { inDim, outDim } = projectionDims(spec, m);
    ones.set(moduleKey(0, m), new Float32Array(m === "down_proj" ? inDim : outDim).fill(1));
  }
  assert.deepEqual(referenceForward(spec, weights, { tokens, adapters: { ia3: ones } }), base);

  // q_proj: output scale after the LoRA-augmented linear (bias included); down_proj: input scale before it.
  const q = projectionDims(spec, "q_proj");
  const down = projectionDims(spec, "down_proj");
  const qScale = rng.normals(q.outDim, 0.3, 1);
  const downScale = rng.normals(down.inDim, 0.3, 1);
  const lora = new Map([
    [moduleKey(1, "q_proj"), randomLora(rng, spec, "q_proj", 2)],
    [moduleKey(0, "down_proj"), randomLora(rng, spec, "down_proj", 2)],
  ]);
  const ia3 = new Map([
    [moduleKey(1, "q_proj"), qScale],
    [moduleKey(0, "down_proj"), downScale],
  ]);
  const merged = cloneWeights(weights);
  const l1 = merged.layers[1]!;
  const l0 = merged.layers[0]!;
  mergeLora(l1.qProj, lora.get(moduleKey(1, "q_proj"))!, q.outDim, q.inDim);
  mergeLora(l0.downProj, lora.get(moduleKey(0, "down_proj"))!, down.outDim, down.inDim);
  for (let o = 0; o < q.outDim; o++) {
    l1.qBias![o]! *= qScale[o]!;
    for (let i = 0; i < q.inDim; i++) l1.qProj[o * q.inDim + i]! *= qScale[o]!;
  }
  for (let o = 0; o < down.outDim; o++) {
    for (let i = 0; i < down.inDim; i++) l0.downProj[o * down.inDim + i]! *= downScale[i]!;
  }
  const adapted = referenceForward(spec, weights, { tokens, adapters: { lora, ia3 } });
  const rel = relDiff(adapted, referenceForward(spec, merged, { tokens }));
  t.diagnostic(`IA3+LoRA vs scaled merged weights relative diff ${rel.toExponential(2)}`);
  assert.ok(rel < 1e-5, `relative diff ${rel}`);
  assert.ok(relDiff(adapted, base) > 1e-2);
});

test("bottleneck: zero up/upBias is the identity, a nonzero one changes the output", () => {
  const { spec, weights } = makeRandomModel({}, 11, { std: 0.2 });
  const rng = makeRng(12);
  const tokens = randomTokens(rng, 6, spec.vocabSize);
  const d = spec.hiddenSize;
  const module = (upStd: number): BottleneckModuleWeights => ({
    size: 5,
    down: rng.normals(5 * d, 0.3),
    downBias: rng.normals(5, 0.3),
    up: upStd === 0 ? new Float32Array(d * 5) : rng.normals(d * 5, upStd),
    upBias: upStd === 0 ? new Float32Array(d) : rng.normals(d, upStd),
  });
  const zero = new Map([
    [moduleKey(0, "attn"), module(0)],
    [moduleKey(1, "mlp"), module(0)],
  ]);
  const base = referenceForward(spec, weights, { tokens });
  assert.deepEqual(referenceForward(spec, weights, { tokens, adapters: { bottleneck: zero } }), base);
  for (const place of ["attn", "mlp"]) {
    const one = new Map([[moduleKey(1, place), module(0.3)]]);
    assert.ok(
      relDiff(referenceForward(spec, weights, { tokens, adapters: { bottleneck: one } }), base) > 1e-3,
    );
  }
});

test("a virtual embedding row equal to embed[id] gives the same logits as the token id", () => {
  const { spec, weights } = makeRandomModel({ tieWordEmbeddings: true }, 21, { std: 0.2 });
  const d = spec.hiddenSize;
  const virtualEmbeddings = new Float32Array(2 * d);
  virtualEmbeddings.set(weights.embed.subarray(9 * d, 10 * d), 0);
  virtualEmbeddings.set(weights.embed.subarray(40 * d, 41 * d), d);
  const viaIds = referenceForward(spec, weights, { tokens: [5, 9, 7, 40, 3] });
  const V = spec.vocabSize;
  const viaRows = referenceForward(spec, weights, { tokens: [5, V, 7, V + 1, 3], virtualEmbeddings });
  assert.deepEqual(viaRows, viaIds);
  assert.throws(() => referenceForward(spec, weights, { tokens: [V + 2], virtualEmbeddings }), /virtual/);
});

test("prefix keys/values from a first run reproduce the continuation of the full run", (t) => {
  const { spec, weights } = makeRandomModel({ qkvBias: true }, 31, { std: 0.2 });
  const rng = makeRng(32);
  const tokens = randomTokens(rng, 11, spec.vocabSize);
  const n = 4;
  const full = referenceRun(spec, weights, { tokens });
  const head = referenceRun(spec, weights, { tokens: tokens.slice(0, n) });
  assert.equal(head.keys[0]!.length, spec.numKvHeads * n * spec.headDim);
  // The full run's cache, restricted to the first n tokens, is what the head run produced.
  const perHead = (kv: Float32Array, len: number, upto: number) =>
    Array.from({ length: spec.numKvHeads }, (_, h) =>
      Array.from(kv.subarray(h * len * spec.headDim, (h * len + upto) * spec.headDim)),
    ).flat();
  assert.ok(maxAbsDiff(perHead(full.keys[1]!, tokens.length, n), perHead(head.keys[1]!, n, n)) < 1e-6);
  const prefix = { length: n, keys: head.keys, values: head.values };
  const rest = referenceForward(spec, weights, { tokens: tokens.slice(n), prefix });
  const diff = maxAbsDiff(rest, full.logits.subarray(n * spec.vocabSize));
  t.diagnostic(`prefix continuation vs full run max |Δlogit| ${diff.toExponential(2)}`);
  assert.ok(diff < 1e-5, `max diff ${diff}`);
  // Positions default to prefix.length + index: giving them explicitly changes nothing.
  const explicit = tokens.slice(n).map((_, i) => n + i);
  assert.deepEqual(
    referenceForward(spec, weights, { tokens: tokens.slice(n), prefix, positions: explicit }),
    rest,
  );
});

test("GQA: head h reads kv head floor(h / group), same as MHA with duplicated kv heads", () => {
  const { spec, weights } = makeRandomModel({ numHeads: 4, numKvHeads: 2, qkvBias: true }, 41, { std: 0.2 });
  const mhaSpec: ModelSpec = { ...spec, numKvHeads: 4 };
  const hs = spec.headDim;
  const d = spec.hiddenSize;
  const dup = (a: Float32Array, width: number) => {
    const out = new Float32Array(a.length * 2);
    for (let h = 0; h < 4; h++)
      out.set(a.subarray((h >> 1) * hs * width, ((h >> 1) + 1) * hs * width), h * hs * width);
    return out;
  };
  const mha = cloneWeights(weights);
  for (const l of mha.layers) {
    Object.assign(l, {
      kProj: dup(l.kProj, d),
      vProj: dup(l.vProj, d),
      kBias: dup(l.kBias!, 1),
      vBias: dup(l.vBias!, 1),
    });
  }
  const tokens = randomTokens(makeRng(42), 7, spec.vocabSize);
  assert.ok(
    maxAbsDiff(referenceForward(mhaSpec, mha, { tokens }), referenceForward(spec, weights, { tokens })) <
      1e-12,
  );
});

test("linear rope scaling by f equals unscaled rope at positions / f", () => {
  const { spec, weights } = makeRandomModel({}, 51, { std: 0.2 });
  const scaled: ModelSpec = { ...spec, ropeScaling: { type: "linear", factor: 2 } };
  const tokens = randomTokens(makeRng(52), 6, spec.vocabSize);
  const positions = tokens.map((_, i) => 2 * i);
  assert.deepEqual(
    referenceForward(scaled, weights, { tokens, positions }),
    referenceForward(spec, weights, { tokens }),
  );
});

test("Qwen2 biases, GQA, MHA and llama3 rope scaling run and stay finite", () => {
  const configs: Partial<ModelSpec>[] = [
    { architecture: "Qwen2ForCausalLM", qkvBias: true, numHeads: 8, numKvHeads: 2, tieWordEmbeddings: true },
    { qkvBias: true, oBias: true, numHeads: 4, numKvHeads: 4 },
    { numHeads: 4, numKvHeads: 1, headDim: 16, hiddenSize: 48 },
    {
      ropeScaling: {
        type: "llama3",
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 64,
      },
    },
  ];
  configs.forEach((overrides, i) => {
    const { spec, weights } = makeRandomModel(overrides, 60 + i, { std: 0.2 });
    const tokens = randomTokens(makeRng(70 + i), 10, spec.vocabSize);
    const positions = tokens.map((_, j) => 50 + 7 * j);
    const logits = referenceForward(spec, weights, { tokens, positions });
    assert.equal(logits.length, tokens.length * spec.vocabSize);
    assert.ok(allFinite(logits), `config ${i} produced non-finite logits`);
    const lp = logSoftmax(row(logits, 0, spec.vocabSize));
    assert.ok(Math.abs(lp.reduce((s, v) => s + Math.exp(v), 0) - 1) < 1e-9);
    if (spec.ropeScaling) {
      const plain = referenceForward({ ...spec, ropeScaling: null }, weights, { tokens, positions });
      assert.ok(maxAbsDiff(logits, plain) > 1e-6, "llama3 scaling must change far positions");
    }
  });
});
