/** @module model/checkpoint — load a HuggingFace checkpoint directory (config + safetensors, single or sharded). */
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { unsupportedModel } from "../errors.ts";
import { type ModelSpec, parseModelSpec } from "./model-spec.ts";
import { type FloatTensor, readSafetensors, type SafetensorsDtype, SafetensorsError } from "./safetensors.ts";

/** Linear weights keep HF's layout [out, in]; vectors are [dim]. */
export interface LayerWeights {
  inputNorm: Float32Array;
  qProj: Float32Array;
  kProj: Float32Array;
  vProj: Float32Array;
  oProj: Float32Array;
  qBias: Float32Array | null;
  kBias: Float32Array | null;
  vBias: Float32Array | null;
  oBias: Float32Array | null;
  postNorm: Float32Array;
  gateProj: Float32Array;
  upProj: Float32Array;
  downProj: Float32Array;
}

export interface BaseWeights {
  /** [vocab, hidden] */
  embed: Float32Array;
  layers: LayerWeights[];
  finalNorm: Float32Array;
  /** [vocab, hidden]; the same array as `embed` when embeddings are tied. */
  lmHead: Float32Array;
}

/** Sampling defaults from generation_config.json (absent fields stay undefined). */
export interface GenerationDefaults {
  temperature?: number;
  topP?: number;
  topK?: number;
  maxNewTokens?: number;
  eosTokenIds: number[];
}

export interface Checkpoint {
  dir: string;
  spec: ModelSpec;
  weights: BaseWeights;
  generation: GenerationDefaults;
  /** sha256 over config.json and every weight file: the build cache key. */
  contentHash: string;
  parameterCount: number;
  storedDtypes: SafetensorsDtype[];
}

function readJson(file: string): unknown {
  try {
    return JSON.parse(readFileSync(file, "utf8"));
  } catch (error) {
    throw unsupportedModel(`${file}: cannot read JSON (${(error as Error).message})`);
  }
}

/** The weight files of a checkpoint: one model.safetensors or the shards its index names. */
export function weightFiles(dir: string): string[] {
  const single = join(dir, "model.safetensors");
  if (existsSync(single)) return [single];
  const indexFile = join(dir, "model.safetensors.index.json");
  if (!existsSync(indexFile)) {
    throw unsupportedModel(
      `${dir}: no model.safetensors or model.safetensors.index.json (pytorch .bin is not supported)`,
    );
  }
  const index = z.object({ weight_map: z.record(z.string(), z.string()) }).safeParse(readJson(indexFile));
  if (!index.success) throw unsupportedModel(`${indexFile}: weight_map missing or malformed`);
  return [...new Set(Object.values(index.data.weight_map))].sort().map((f) => join(dir, f));
}

const generationSchema = z
  .object({
    temperature: z.number().nonnegative().optional(),
    top_p: z.number().positive().max(1).optional(),
    top_k: z.number().int().nonnegative().optional(),
    max_new_tokens: z.number().int().positive().optional(),
    eos_token_id: z.union([z.number().int(), z.array(z.number().int())]).optional(),
    do_sample: z.boolean().optional(),
  })
  .loose();

function readGenerationDefaults(dir: string): GenerationDefaults {
  const file = join(dir, "generation_config.json");
  if (!existsSync(file)) return { eosTokenIds: [] };
  const parsed = generationSchema.safeParse(readJson(file));
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw unsupportedModel(`${file}: ${issue.path.join(".")}: ${issue.message}`);
  }
  const g = parsed.data;
  const eos =
    g.eos_token_id === undefined ? [] : Array.isArray(g.eos_token_id) ? g.eos_token_id : [g.eos_token_id];
  return {
    // do_sample=false means greedy is the author's default.
    temperature: g.do_sample === false ? 0 : g.temperature,
    topP: g.top_p,
    topK: g.top_k,
    maxNewTokens: g.max_new_tokens,
    eosTokenIds: eos,
  };
}

function takeTensor(
  tensors: Map<string, FloatTensor>,
  name: string,
  shape: number[],
  required: boolean,
): Float32Array | null {
  const t = tensors.get(name);
  if (!t) {
    if (required) throw unsupportedModel(`checkpoint is missing tensor ${name}`, name);
    return null;
  }
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw unsupportedModel(`tensor ${name} has shape [${t.shape}], config.json implies [${shape}]`, name);
  }
  for (let i = 0; i < t.data.length; i++) {
    if (!Number.isFinite(t.data[i]!))
      throw unsupportedModel(`tensor ${name} holds a non-finite value at index ${i}`, name);
  }
  return t.data;
}

export function assembleWeights(spec: ModelSpec, tensors: Map<string, FloatTensor>): BaseWeights {
  const d = spec.hiddenSize;
  const qDim = spec.numHeads * spec.headDim;
  const kvDim = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  const req = (name: string, shape: number[]) => takeTensor(tensors, name, shape, true)!;
  const layers: LayerWeights[] = [];
  for (let i = 0; i < spec.numLayers; i++) {
    const p = `model.layers.${i}.`;
    layers.push({
      inputNorm: req(`${p}input_layernorm.weight`, [d]),
      qProj: req(`${p}self_attn.q_proj.weight`, [qDim, d]),
      kProj: req(`${p}self_attn.k_proj.weight`, [kvDim, d]),
      vProj: req(`${p}self_attn.v_proj.weight`, [kvDim, d]),
      oProj: req(`${p}self_attn.o_proj.weight`, [d, qDim]),
      qBias: spec.qkvBias ? req(`${p}self_attn.q_proj.bias`, [qDim]) : null,
      kBias: spec.qkvBias ? req(`${p}self_attn.k_proj.bias`, [kvDim]) : null,
      vBias: spec.qkvBias ? req(`${p}self_attn.v_proj.bias`, [kvDim]) : null,
      oBias: spec.oBias ? req(`${p}self_attn.o_proj.bias`, [d]) : null,
      postNorm: req(`${p}post_attention_layernorm.weight`, [d]),
      gateProj: req(`${p}mlp.gate_proj.weight`, [ff, d]),
      upProj: req(`${p}mlp.up_proj.weight`, [ff, d]),
      downProj: req(`${p}mlp.down_proj.weight`, [d, ff]),
    });
  }
  const embed = req("model.embed_tokens.weight", [spec.vocabSize, d]);
  const lmHead = spec.tieWordEmbeddings
    ? (takeTensor(tensors, "lm_head.weight", [spec.vocabSize, d], false) ?? embed)
    : req("lm_head.weight", [spec.vocabSize, d]);
  return { embed, layers, finalNorm: req("model.norm.weight", [d]), lmHead };
}

function hashFiles(files: string[]): string {
  const hash = createHash("sha256");
  for (const file of files) hash.update(readFileSync(file));
  return hash.digest("hex");
}

/** What the server needs without reading the weights: shape, defaults, and the build-cache key. */
export interface CheckpointInfo {
  dir: string;
  spec: ModelSpec;
  generation: GenerationDefaults;
  contentHash: string;
  files: string[];
}

export function inspectCheckpoint(dir: string): CheckpointInfo {
  const configFile = join(dir, "config.json");
  if (!existsSync(configFile)) throw unsupportedModel(`${dir}: config.json not found`);
  const spec = parseModelSpec(readJson(configFile));
  const files = weightFiles(dir);
  const generation = readGenerationDefaults(dir);
  if (generation.eosTokenIds.length === 0) generation.eosTokenIds = spec.eosTokenIds;
  return { dir, spec, generation, contentHash: hashFiles([configFile, ...files]), files };
}

export function loadCheckpoint(dir: string, info: CheckpointInfo = inspectCheckpoint(dir)): Checkpoint {
  const { spec } = info;
  const tensors = new Map<string, FloatTensor>();
  const storedDtypes = new Set<SafetensorsDtype>();
  for (const file of info.files) {
    try {
      for (const [name, t] of readSafetensors(file).tensors) {
        tensors.set(name, t);
        storedDtypes.add(t.storedDtype);
      }
    } catch (error) {
      if (error instanceof SafetensorsError) throw unsupportedModel(error.message);
      throw error;
    }
  }
  const weights = assembleWeights(spec, tensors);
  let parameterCount = 0;
  for (const [name, t] of tensors)
    if (name !== "lm_head.weight" || !spec.tieWordEmbeddings) parameterCount += t.data.length;
  return {
    dir,
    spec,
    weights,
    generation: info.generation,
    contentHash: info.contentHash,
    parameterCount,
    storedDtypes: [...storedDtypes],
  };
}
