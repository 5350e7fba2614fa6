/** Tests for parseModelSpec and ropeInverseFrequencies: supported configs, defaults, scaling, rejections. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { TaskmuxError } from "../../src/errors.ts";
import { parseModelSpec, ropeInverseFrequencies } from "../../src/model/model-spec.ts";

/** A minimal Llama config.json; override any field (undefined deletes it, null keeps a JSON null). */
function makeConfig(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const config: Record<string, unknown> = {
    architectures: ["LlamaForCausalLM"],
    hidden_size: 64,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    intermediate_size: 172,
    vocab_size: 512,
    max_position_embeddings: 1024,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    hidden_act: "silu",
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    ...overrides,
  };
  for (const [key, value] of Object.entries(overrides)) if (value === undefined) delete config[key];
  return config;
}

test("Llama, Mistral and Qwen2 configs parse; Qwen2 implies q/k/v biases", () => {
  const cases: { name: string; config: Record<string, unknown>; qkvBias: boolean; oBias: boolean }[] = [
    { name: "llama", config: makeConfig(), qkvBias: false, oBias: false },
    {
      name: "llama with attention_bias",
      config: makeConfig({ attention_bias: true }),
      qkvBias: true,
      oBias: true,
    },
    {
      name: "mistral",
      config: makeConfig({ architectures: ["MistralForCausalLM"], sliding_window: null }),
      qkvBias: false,
      oBias: false,
    },
    {
      name: "qwen2",
      config: makeConfig({ architectures: ["Qwen2ForCausalLM"], use_sliding_window: false }),
      qkvBias: true,
      oBias: false,
    },
  ];
  for (const c of cases) {
    const spec = parseModelSpec(c.config);
    assert.equal(spec.architecture, (c.config.architectures as string[])[0], c.name);
    assert.equal(spec.qkvBias, c.qkvBias, c.name);
    assert.equal(spec.oBias, c.oBias, c.name);
    assert.equal(spec.hiddenSize, 64, c.name);
    assert.equal(spec.numLayers, 2, c.name);
    assert.equal(spec.intermediateSize, 172, c.name);
    assert.equal(spec.vocabSize, 512, c.name);
  }
});

test("a full Llama config maps every field", () => {
  const spec = parseModelSpec(
    makeConfig({ tie_word_embeddings: true, eos_token_id: [2, 7], rope_theta: 500000, rms_norm_eps: 1e-6 }),
  );
  assert.deepEqual(spec, {
    architecture: "LlamaForCausalLM",
    hiddenSize: 64,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 16,
    intermediateSize: 172,
    vocabSize: 512,
    rmsNormEps: 1e-6,
    ropeTheta: 500000,
    ropeScaling: null,
    maxPositionEmbeddings: 1024,
    tieWordEmbeddings: true,
    qkvBias: false,
    oBias: false,
    bosTokenId: 1,
    eosTokenIds: [2, 7],
  });
});

test("omitted fields take HF defaults: no GQA, head_dim = hidden / heads, theta 10000", () => {
  const spec = parseModelSpec(
    makeConfig({
      num_key_value_heads: undefined,
      rope_theta: undefined,
      rms_norm_eps: undefined,
      max_position_embeddings: undefined,
      tie_word_embeddings: undefined,
      bos_token_id: undefined,
      eos_token_id: undefined,
    }),
  );
  assert.equal(spec.numKvHeads, 4);
  assert.equal(spec.headDim, 16);
  assert.equal(spec.ropeTheta, 10000);
  assert.equal(spec.rmsNormEps, 1e-6);
  assert.equal(spec.maxPositionEmbeddings, 2048);
  assert.equal(spec.tieWordEmbeddings, false);
  assert.equal(spec.bosTokenId, null);
  assert.deepEqual(spec.eosTokenIds, []);
});

test("head_dim in the config overrides hidden_size / num_attention_heads", () => {
  assert.equal(parseModelSpec(makeConfig({ head_dim: 32 })).headDim, 32);
});

test("rope_scaling linear and llama3 are parsed; default means none", () => {
  const cases: { scaling: Record<string, unknown>; expected: unknown }[] = [
    { scaling: { type: "linear", factor: 2 }, expected: { type: "linear", factor: 2 } },
    { scaling: { rope_type: "linear", factor: 4 }, expected: { type: "linear", factor: 4 } },
    { scaling: { rope_type: "default" }, expected: null },
    {
      scaling: {
        rope_type: "llama3",
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 8192,
      },
      expected: {
        type: "llama3",
        factor: 8,
        lowFreqFactor: 1,
        highFreqFactor: 4,
        originalMaxPositionEmbeddings: 8192,
      },
    },
  ];
  for (const c of cases) {
    assert.deepEqual(parseModelSpec(makeConfig({ rope_scaling: c.scaling })).ropeScaling, c.expected);
  }
});

test("ropeInverseFrequencies applies linear and llama3 scaling as computed by hand", () => {
  // head_dim 8, theta 10000: inv_freq = 10000^(-2i/8) = [1, 0.1, 0.01, 0.001].
  const base = { hidden_size: 32, num_attention_heads: 4, num_key_value_heads: 4 };
  const cases: { name: string; scaling: Record<string, unknown> | null; expected: number[] }[] = [
    { name: "unscaled", scaling: null, expected: [1, 0.1, 0.01, 0.001] },
    { name: "linear x2", scaling: { type: "linear", factor: 2 }, expected: [0.5, 0.05, 0.005, 0.0005] },
    {
      // original 1024, low 1, high 4: wavelengths 2*pi/inv = [6.28, 62.8, 628, 6283] against [256, 1024].
      // i=0,1: high frequency, kept. i=3: wavelength > 1024, divided by 8.
      // i=2: smooth = (1024 / 628.3185 - 1) / 3 = 0.2099155; inv = (1 - s) * 0.01 / 8 + s * 0.01.
      name: "llama3",
      scaling: {
        rope_type: "llama3",
        factor: 8,
        low_freq_factor: 1,
        high_freq_factor: 4,
        original_max_position_embeddings: 1024,
      },
      expected: [1, 0.1, 0.003086760967011274, 0.000125],
    },
  ];
  for (const c of cases) {
    const inv = ropeInverseFrequencies(parseModelSpec(makeConfig({ ...base, rope_scaling: c.scaling })));
    assert.equal(inv.length, 4, c.name);
    inv.forEach((v, i) => {
      const want = c.expected[i]!;
      assert.ok(Math.abs(v - want) <= 1e-12 * Math.max(1, want), `${c.name}[${i}]: ${v} vs ${want}`);
    });
  }
});

test("an active sliding window caps the served context; Qwen2 only when use_sliding_window", () => {
  const cases: { name: string; overrides: Record<string, unknown>; max: number }[] = [
    {
      name: "mistral window",
      overrides: { architectures: ["MistralForCausalLM"], sliding_window: 256 },
      max: 256,
    },
    { name: "window above the context", overrides: { sliding_window: 4096 }, max: 1024 },
    {
      name: "qwen2 window disabled",
      overrides: { architectures: ["Qwen2ForCausalLM"], sliding_window: 256, use_sliding_window: false },
      max: 1024,
    },
    {
      name: "qwen2 window enabled",
      overrides: { architectures: ["Qwen2ForCausalLM"], sliding_window: 256, use_sliding_window: true },
      max: 256,
    },
    { name: "null window", overrides: { sliding_window: null }, max: 1024 },
  ];
  for (const c of cases) {
    assert.equal(parseModelSpec(makeConfig(c.overrides)).maxPositionEmbeddings, c.max, c.name);
  }
});

test("unsupported configs are rejected with unsupported_model naming the field and value", () => {
  const cases: { name: string; overrides: Record<string, unknown>; param: string; mentions: string[] }[] = [
    {
      name: "unknown architecture",
      overrides: { architectures: ["GPT2LMHeadModel"] },
      param: "architectures",
      mentions: ["GPT2LMHeadModel"],
    },
    {
      name: "gelu",
      overrides: { hidden_act: "gelu" },
      param: "hidden_act",
      mentions: ["hidden_act", "gelu"],
    },
    { name: "mlp_bias", overrides: { mlp_bias: true }, param: "mlp_bias", mentions: ["mlp_bias", "true"] },
    {
      name: "heads not divisible",
      overrides: { num_attention_heads: 4, num_key_value_heads: 3 },
      param: "num_key_value_heads",
      mentions: ["num_attention_heads (4)", "num_key_value_heads (3)"],
    },
    {
      name: "yarn rope",
      overrides: { rope_scaling: { rope_type: "yarn", factor: 4 } },
      param: "rope_scaling.type",
      mentions: ["yarn"],
    },
    {
      name: "odd head dim",
      overrides: { head_dim: 7 },
      param: "head_dim",
      mentions: ["7"],
    },
    {
      name: "missing hidden_size",
      overrides: { hidden_size: undefined },
      param: "hidden_size",
      mentions: ["hidden_size"],
    },
    {
      name: "non-integer vocab",
      overrides: { vocab_size: 10.5 },
      param: "vocab_size",
      mentions: ["vocab_size"],
    },
  ];
  for (const c of cases) {
    assert.throws(
      () => parseModelSpec(makeConfig(c.overrides)),
      (error: unknown) => {
        assert.ok(error instanceof TaskmuxError, c.name);
        assert.equal(error.type, "unsupported_model", c.name);
        assert.equal(error.param, c.param, c.name);
        for (const m of c.mentions)
          assert.ok(error.message.includes(m), `${c.name}: "${error.message}" lacks ${m}`);
        return true;
      },
      c.name,
    );
  }
});

test("a llama3 rope_scaling with a non-positive factor is rejected naming the field", () => {
  assert.throws(
    () => parseModelSpec(makeConfig({ rope_scaling: { rope_type: "llama3", factor: 0 } })),
    (error: unknown) =>
      error instanceof TaskmuxError &&
      error.type === "unsupported_model" &&
      /rope_scaling\.factor/.test(error.message),
  );
});
