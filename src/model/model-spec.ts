/** @module model/model-spec — parse a HuggingFace Llama-family config.json into a validated ModelSpec. */
import { z } from "zod";
import { unsupportedModel } from "../errors.ts";

export const SUPPORTED_ARCHITECTURES = [
  "LlamaForCausalLM",
  "MistralForCausalLM",
  "Qwen2ForCausalLM",
] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

export type RopeScaling =
  | { type: "linear"; factor: number }
  | {
      type: "llama3";
      factor: number;
      lowFreqFactor: number;
      highFreqFactor: number;
      originalMaxPositionEmbeddings: number;
    };

/** Everything the builder, reference and engine need to know about a base model's shape. */
export interface ModelSpec {
  architecture: Architecture;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  intermediateSize: number;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling | null;
  /** Longest sequence (prompt + completion) the model serves. */
  maxPositionEmbeddings: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (Qwen2, or Llama with attention_bias). */
  qkvBias: boolean;
  /** o_proj carries a bias (Llama with attention_bias). */
  oBias: boolean;
  bosTokenId: number | null;
  eosTokenIds: number[];
}

const tokenIds = z.union([z.number().int(), z.array(z.number().int())]).nullish();

const rawConfigSchema = z
  .object({
    architectures: z.array(z.string()).min(1),
    hidden_size: z.number().int().positive(),
    num_hidden_layers: z.number().int().positive(),
    num_attention_heads: z.number().int().positive(),
    num_key_value_heads: z.number().int().positive().nullish(),
    head_dim: z.number().int().positive().nullish(),
    intermediate_size: z.number().int().positive(),
    vocab_size: z.number().int().positive(),
    rms_norm_eps: z.number().positive().default(1e-6),
    rope_theta: z.number().positive().default(10000),
    rope_scaling: z.record(z.string(), z.unknown()).nullish(),
    max_position_embeddings: z.number().int().positive().default(2048),
    tie_word_embeddings: z.boolean().default(false),
    hidden_act: z.string().default("silu"),
    attention_bias: z.boolean().default(false),
    mlp_bias: z.boolean().default(false),
    sliding_window: z.number().int().nullish(),
    use_sliding_window: z.boolean().nullish(),
    bos_token_id: tokenIds,
    eos_token_id: tokenIds,
  })
  .loose();

function toIdList(value: number | number[] | null | undefined): number[] {
  if (value === null || value === undefined) return [];
  return Array.isArray(value) ? value : [value];
}

function parseRopeScaling(raw: Record<string, unknown> | null | undefined): RopeScaling | null {
  if (!raw) return null;
  const type = raw.rope_type ?? raw.type;
  const num = (key: string, fallback?: number): number => {
    const value = raw[key] ?? fallback;
    if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
      throw unsupportedModel(`rope_scaling.${key} must be a positive number, got ${JSON.stringify(value)}`);
    }
    return value;
  };
  if (type === "default") return null;
  if (type === "linear") return { type: "linear", factor: num("factor") };
  if (type === "llama3") {
    return {
      type: "llama3",
      factor: num("factor"),
      lowFreqFactor: num("low_freq_factor", 1),
      highFreqFactor: num("high_freq_factor", 4),
      originalMaxPositionEmbeddings: num("original_max_position_embeddings", 8192),
    };
  }
  throw unsupportedModel(
    `rope_scaling type ${JSON.stringify(type)} is not supported (supported: linear, llama3)`,
    "rope_scaling.type",
  );
}

/** Validate a parsed config.json; every rejection names the field and the value. */
export function parseModelSpec(raw: unknown): ModelSpec {
  const parsed = rawConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw unsupportedModel(`config.json: ${issue.path.join(".")}: ${issue.message}`, issue.path.join("."));
  }
  const c = parsed.data;
  const architecture = c.architectures[0]!;
  if (!(SUPPORTED_ARCHITECTURES as readonly string[]).includes(architecture)) {
    throw unsupportedModel(
      `config.json: architectures[0] = ${JSON.stringify(architecture)} is not supported (supported: ${SUPPORTED_ARCHITECTURES.join(", ")})`,
      "architectures",
    );
  }
  if (c.hidden_act !== "silu") {
    throw unsupportedModel(
      `config.json: hidden_act = ${JSON.stringify(c.hidden_act)} is not supported (only silu)`,
      "hidden_act",
    );
  }
  if (c.mlp_bias) throw unsupportedModel("config.json: mlp_bias = true is not supported", "mlp_bias");
  const numKvHeads = c.num_key_value_heads ?? c.num_attention_heads;
  if (c.num_attention_heads % numKvHeads !== 0) {
    throw unsupportedModel(
      `config.json: num_attention_heads (${c.num_attention_heads}) must be a multiple of num_key_value_heads (${numKvHeads})`,
      "num_key_value_heads",
    );
  }
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) {
    throw unsupportedModel(`config.json: head dimension ${headDim} must be an even integer`, "head_dim");
  }
  let maxPositions = c.max_position_embeddings;
  const slidingActive = architecture === "Qwen2ForCausalLM" ? c.use_sliding_window === true : true;
  if (slidingActive && c.sliding_window && c.sliding_window < maxPositions) {
    // Serving no more than the window keeps plain causal attention exact for every request.
    maxPositions = c.sliding_window;
  }
  const isQwen2 = architecture === "Qwen2ForCausalLM";
  return {
    architecture: architecture as Architecture,
    hiddenSize: c.hidden_size,
    numLayers: c.num_hidden_layers,
    numHeads: c.num_attention_heads,
    numKvHeads,
    headDim,
    intermediateSize: c.intermediate_size,
    vocabSize: c.vocab_size,
    rmsNormEps: c.rms_norm_eps,
    ropeTheta: c.rope_theta,
    ropeScaling: parseRopeScaling(c.rope_scaling),
    maxPositionEmbeddings: maxPositions,
    tieWordEmbeddings: c.tie_word_embeddings,
    qkvBias: isQwen2 || c.attention_bias,
    oBias: !isQwen2 && c.attention_bias,
    bosTokenId: toIdList(c.bos_token_id)[0] ?? null,
    eosTokenIds: toIdList(c.eos_token_id),
  };
}

/**
 * RoPE inverse frequencies [headDim/2], with HF's `linear` and `llama3` scaling applied
 * (transformers `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`).
 */
export function ropeInverseFrequencies(spec: ModelSpec): Float64Array {
  const half = spec.headDim / 2;
  const inv = new Float64Array(half);
  for (let i = 0; i < half; i++) inv[i] = 1 / spec.ropeTheta ** ((2 * i) / spec.headDim);
  const s = spec.ropeScaling;
  if (s?.type === "linear") {
    for (let i = 0; i < half; i++) inv[i] /= s.factor;
  } else if (s?.type === "llama3") {
    const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / inv[i]!;
      if (wavelen > lowFreqWavelen) {
        inv[i] = inv[i]! / s.factor;
      } else if (wavelen >= highFreqWavelen) {
        const smooth =
          (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) /
          (s.highFreqFactor - s.lowFreqFactor);
        inv[i] = (1 - smooth) * (inv[i]! / s.factor) + smooth * inv[i]!;
      }
    }
  }
  return inv;
}

/** cos/sin tables [maxPositions, headDim/2] for rotate-half RoPE, computed in float64 then rounded. */
export function ropeTables(spec: ModelSpec, maxPositions = spec.maxPositionEmbeddings) {
  const inv = ropeInverseFrequencies(spec);
  const half = inv.length;
  const cos = new Float32Array(maxPositions * half);
  const sin = new Float32Array(maxPositions * half);
  for (let p = 0; p < maxPositions; p++) {
    for (let i = 0; i < half; i++) {
      // HF computes the angle in float32 (inv_freq float32 @ position float32); match that rounding.
      const angle = Math.fround(Math.fround(inv[i]!) * p);
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin, half };
}
