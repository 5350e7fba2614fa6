/**
 * @module model/maker/make-model — writes a deterministic random-weight Llama model in HuggingFace layout
 * (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json).
 */
import { mkdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeSafetensors } from "../safetensors.ts";
import { buildByteLevelTokenizer } from "./byte-level-tokenizer.ts";
import { makeRng } from "./prng.ts";

export interface ModelPreset {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  intermediateSize: number;
  vocabSize: number;
  ropeTheta: number;
  maxPositionEmbeddings: number;
}

export const PRESETS = {
  /** For tests: small enough that a graph builds and runs in well under a second. */
  tiny: {
    hiddenSize: 64,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    intermediateSize: 172,
    vocabSize: 512,
    ropeTheta: 10000,
    maxPositionEmbeddings: 512,
  },
  /** The embedded default in models/default: quick to make at first start, real tokenizer, GQA. */
  default: {
    hiddenSize: 256,
    numLayers: 4,
    numHeads: 8,
    numKvHeads: 4,
    intermediateSize: 688,
    vocabSize: 2048,
    ropeTheta: 10000,
    maxPositionEmbeddings: 2048,
  },
  /** SmolLM2-135M's dimensions, for benchmarks. */
  "smollm2-135m": {
    hiddenSize: 576,
    numLayers: 30,
    numHeads: 9,
    numKvHeads: 3,
    intermediateSize: 1536,
    vocabSize: 49152,
    ropeTheta: 100000,
    maxPositionEmbeddings: 8192,
  },
} satisfies Record<string, ModelPreset>;

export type PresetName = keyof typeof PRESETS;

const SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

function hfConfig(p: ModelPreset, eosId: number, bosId: number) {
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: p.hiddenSize,
    num_hidden_layers: p.numLayers,
    num_attention_heads: p.numHeads,
    num_key_value_heads: p.numKvHeads,
    intermediate_size: p.intermediateSize,
    vocab_size: p.vocabSize,
    rms_norm_eps: 1e-5,
    rope_theta: p.ropeTheta,
    rope_scaling: null,
    max_position_embeddings: p.maxPositionEmbeddings,
    tie_word_embeddings: true,
    hidden_act: "silu",
    attention_bias: false,
    mlp_bias: false,
    bos_token_id: bosId,
    eos_token_id: eosId,
    torch_dtype: "float32",
  };
}

/** Tensors in HF order; linear and embedding ~ N(0, 0.02), norms ~ 1 + N(0, 0.02). */
function randomTensors(p: ModelPreset, seed: number) {
  const rng = makeRng(seed);
  const headDim = p.hiddenSize / p.numHeads;
  const kv = p.numKvHeads * headDim;
  const tensors: Record<string, { shape: number[]; data: Float32Array }> = {};
  const add = (name: string, shape: number[], mean = 0) => {
    tensors[name] = {
      shape,
      data: rng.normals(
        shape.reduce((a, b) => a * b, 1),
        0.02,
        mean,
      ),
    };
  };
  add("model.embed_tokens.weight", [p.vocabSize, p.hiddenSize]);
  for (let i = 0; i < p.numLayers; i++) {
    const pre = `model.layers.${i}.`;
    add(`${pre}input_layernorm.weight`, [p.hiddenSize], 1);
    add(`${pre}self_attn.q_proj.weight`, [p.hiddenSize, p.hiddenSize]);
    add(`${pre}self_attn.k_proj.weight`, [kv, p.hiddenSize]);
    add(`${pre}self_attn.v_proj.weight`, [kv, p.hiddenSize]);
    add(`${pre}self_attn.o_proj.weight`, [p.hiddenSize, p.hiddenSize]);
    add(`${pre}post_attention_layernorm.weight`, [p.hiddenSize], 1);
    add(`${pre}mlp.gate_proj.weight`, [p.intermediateSize, p.hiddenSize]);
    add(`${pre}mlp.up_proj.weight`, [p.intermediateSize, p.hiddenSize]);
    add(`${pre}mlp.down_proj.weight`, [p.hiddenSize, p.intermediateSize]);
  }
  add("model.norm.weight", [p.hiddenSize], 1);
  return tensors;
}

export interface MakeModelOptions {
  preset: PresetName;
  seed: number;
  out: string;
}

/** Write the model into `out` atomically (a temporary sibling folder renamed into place). */
export function makeModel({ preset, seed, out }: MakeModelOptions): void {
  const p: ModelPreset = PRESETS[preset];
  const { tokenizerJson, tokenizerConfig } = buildByteLevelTokenizer({
    vocabSize: p.vocabSize,
    specialTokens: SPECIAL_TOKENS,
  });
  const eosId = p.vocabSize - SPECIAL_TOKENS.length; // <|endoftext|>: the specials sit at the end of the vocabulary
  const tmp = `${out}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const json = (name: string, value: unknown) =>
    writeFileSync(join(tmp, name), `${JSON.stringify(value, null, 2)}\n`);
  json("config.json", hfConfig(p, eosId, eosId));
  json("generation_config.json", {
    bos_token_id: eosId,
    eos_token_id: eosId,
    do_sample: true,
    temperature: 0.8,
    top_p: 0.95,
  });
  json("tokenizer.json", tokenizerJson);
  json("tokenizer_config.json", tokenizerConfig);
  writeSafetensors(join(tmp, "model.safetensors"), randomTensors(p, seed), {
    format: "pt",
    producer: `taskmux make-model preset=${preset} seed=${seed}`,
  });
  rmSync(out, { recursive: true, force: true });
  mkdirSync(join(out, ".."), { recursive: true });
  renameSync(tmp, out);
}
