/**
 * @module adapters/formats/lora — PEFT LORA `adapter_model.safetensors` -> per-module A and scaled B.
 *
 * Semantics (PEFT `lora.Linear.forward`): y = x W^T + (x A^T) B^T * s, A [r, in], B [out, r],
 * s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per module from
 * `rank_pattern` / `alpha_pattern` (else `r` / `lora_alpha`). s is folded into B here, so the graph
 * computes (x A^T) b^T with b = s * B.
 *
 * Keys: `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`, also with the adapter
 * name PEFT strips on save still in place (`lora_A.default.weight`) or without the `base_model.model.` prefix.
 * `fan_in_fan_out` is ignored, as PEFT ignores it for nn.Linear targets (it sets it to False with a warning):
 * lora_A / lora_B are nn.Linear weights in the [out, in] layout whatever the flag says.
 */
import { type LoraModuleWeights, moduleKey, projectionDims } from "../../model/contract.ts";
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import {
  expectFinite,
  expectShape,
  incompatible,
  loadFailed,
  readTensorFile,
  shapeText,
} from "./format-shared.ts";
import { type PeftConfig, rejectUnsupportedFeatures } from "./peft-config.ts";
import {
  checkTargetEntries,
  patternValue,
  projectionOfModule,
  type TargetedModule,
  targetedModules,
} from "./peft-targets.ts";

export interface LoraAdapter {
  /** `moduleKey(layer, projection)` -> A [r, in] and b = s * B [out, r]. */
  modules: Map<string, LoraModuleWeights>;
  /** The largest rank of any module (the pool slot width it needs). */
  rank: number;
}

const LORA_KEY = /^(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$/;

function unexpectedKey(file: string, key: string): never {
  if (key.includes("lora_magnitude_vector"))
    throw incompatible(file, `tensor ${key} is a DoRA magnitude; DoRA is not supported`);
  if (key.includes("lora_embedding_"))
    throw incompatible(file, `tensor ${key} adapts an embedding, which taskmux cannot adapt`);
  if (/\.lora_[AB](?:\.[A-Za-z0-9_-]+)?\.bias$/.test(key))
    throw incompatible(file, `tensor ${key} is a LoRA bias (lora_bias), which is not supported`);
  throw loadFailed(file, `unexpected tensor ${key} (not a lora_A / lora_B weight)`);
}

interface Pair {
  module: TargetedModule;
  a?: [string, FloatTensor];
  b?: [string, FloatTensor];
}

function groupTensors(file: string, tensors: Map<string, FloatTensor>, spec: ModelSpec): Map<string, Pair> {
  const pairs = new Map<string, Pair>();
  for (const [key, tensor] of tensors) {
    const m = LORA_KEY.exec(key);
    if (!m) unexpectedKey(file, key);
    const module = projectionOfModule(file, key, m[1]!, spec);
    const pair = pairs.get(module.name) ?? { module };
    const side = m[2] === "A" ? "a" : "b";
    if (pair[side])
      throw loadFailed(file, `tensors ${pair[side][0]} and ${key} are both lora_${m[2]} of ${module.name}`);
    pair[side] = [key, tensor];
    pairs.set(module.name, pair);
  }
  return pairs;
}

function scaledModule(
  file: string,
  pair: Required<Pair>,
  config: PeftConfig,
  spec: ModelSpec,
  maxRank: number,
): LoraModuleWeights {
  const { name, projection } = pair.module;
  const [aKey, a] = pair.a;
  const [bKey, b] = pair.b;
  const { inDim, outDim } = projectionDims(spec, projection);
  const r = patternValue(config.rankPattern, name, config.r);
  const alpha = patternValue(config.alphaPattern, name, config.loraAlpha);
  if (a.shape.length !== 2 || b.shape.length !== 2) {
    throw loadFailed(
      file,
      `${name}: lora_A ${shapeText(a.shape)} and lora_B ${shapeText(b.shape)} must both be 2-D`,
    );
  }
  expectShape(file, aKey, a, [a.shape[0]!, inDim], [false, true], `${projection} input width ${inDim}`);
  expectShape(file, bKey, b, [outDim, b.shape[1]!], [true, false], `${projection} output width ${outDim}`);
  if (a.shape[0] !== b.shape[1]) {
    throw loadFailed(
      file,
      `${name}: lora_A ${shapeText(a.shape)} and lora_B ${shapeText(b.shape)} disagree on the rank`,
    );
  }
  if (a.shape[0] !== r) {
    throw loadFailed(
      file,
      `tensor ${aKey} has rank ${a.shape[0]} (shape ${shapeText(a.shape)}) but adapter_config.json gives r = ${r} for ${name}`,
    );
  }
  if (r > maxRank)
    throw incompatible(file, `${name} has rank ${r}, above this server's maximum LoRA rank ${maxRank}`);
  expectFinite(file, aKey, a.data, inDim);
  expectFinite(file, bKey, b.data, r);
  const scale = config.useRslora ? alpha / Math.sqrt(r) : alpha / r;
  const scaled = new Float32Array(b.data.length);
  for (let i = 0; i < scaled.length; i++) scaled[i] = b.data[i]! * scale;
  expectFinite(file, `${bKey} (scaled by ${scale})`, scaled, r);
  return { rank: r, a: a.data, b: scaled };
}

/** Validate a LoRA adapter's tensors against its config and this base; fold the scale into B. */
export function parseLora(
  tensors: Map<string, FloatTensor>,
  file: string,
  config: PeftConfig,
  spec: ModelSpec,
  maxRank: number,
): LoraAdapter {
  rejectUnsupportedFeatures(config);
  checkTargetEntries(config, spec);
  const pairs = groupTensors(file, tensors, spec);
  const targeted = targetedModules(config, spec);
  if (targeted.length === 0)
    throw incompatible(config.file, "target_modules selects no projection of this base model");
  const selected = new Set(targeted.map((t) => t.name));
  for (const [name, pair] of pairs) {
    if (!selected.has(name)) {
      const key = (pair.a ?? pair.b)![0];
      throw loadFailed(
        file,
        `tensor ${key} is for ${name}, which adapter_config.json (target_modules / layers_to_transform) does not select`,
      );
    }
  }
  const modules = new Map<string, LoraModuleWeights>();
  let rank = 0;
  for (const t of targeted) {
    const pair = pairs.get(t.name);
    if (!pair?.a || !pair.b) {
      const missing = !pair ? "lora_A and lora_B" : !pair.a ? "lora_A" : "lora_B";
      throw loadFailed(file, `${t.name} is targeted but its ${missing} weight is missing`);
    }
    const weights = scaledModule(file, pair as Required<Pair>, config, spec, maxRank);
    modules.set(moduleKey(t.layer, t.projection), weights);
    rank = Math.max(rank, weights.rank);
  }
  return { modules, rank };
}

export function loadLora(file: string, config: PeftConfig, spec: ModelSpec, maxRank: number): LoraAdapter {
  return parseLora(readTensorFile(file), file, config, spec, maxRank);
}
