/**
 * @module adapters/formats/peft-config — read PEFT's `adapter_config.json` loosely (unknown keys are kept and
 * ignored), with PEFT's defaults, and name the configured features taskmux does not serve. Which modules a
 * config selects is peft-targets.ts.
 */
import { z } from "zod";
import { compilePattern, incompatible, loadFailed, readJsonFile, zodIssue } from "./format-shared.ts";

export const PEFT_TYPES = ["LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"] as const;
export type PeftType = (typeof PEFT_TYPES)[number];

/** Our own bottleneck adapter folders also carry an adapter_config.json (see bottleneck.ts). */
export const BOTTLENECK_PEFT_TYPE = "BOTTLENECK";

export interface PeftConfig {
  file: string;
  peftType: PeftType;
  taskType: string | null;
  baseModelNameOrPath: string | null;
  r: number;
  loraAlpha: number;
  useRslora: boolean;
  /** A list (name / suffix match), a regex string (full match), or null (none given). */
  targetModules: string[] | string | null;
  excludeModules: string[] | string | null;
  rankPattern: Record<string, number>;
  alphaPattern: Record<string, number>;
  layersToTransform: number[] | null;
  layersPattern: string[] | null;
  /** Read but ignored: PEFT forces it to false for nn.Linear targets (every Llama projection). */
  fanInFanOut: boolean;
  bias: string;
  useDora: boolean;
  modulesToSave: string[];
  feedforwardModules: string[] | string | null;
  numVirtualTokens: number | null;
  tokenDim: number | null;
  numLayers: number | null;
  numAttentionHeads: number | null;
  numTransformerSubmodules: number | null;
  encoderHiddenSize: number | null;
  encoderReparameterizationType: "MLP" | "LSTM" | null;
  encoderNumLayers: number | null;
  prefixProjection: boolean;
  /** Every key as written (for fields this reader does not model). */
  raw: Record<string, unknown>;
}

const stringOrList = z.union([z.string(), z.array(z.string())]);
const posInt = z.number().int().positive();

const schema = z
  .object({
    peft_type: z.string(),
    task_type: z.string().nullish(),
    base_model_name_or_path: z.string().nullish(),
    r: posInt.nullish(),
    lora_alpha: z.number().positive().nullish(),
    use_rslora: z.boolean().nullish(),
    target_modules: stringOrList.nullish(),
    exclude_modules: stringOrList.nullish(),
    rank_pattern: z.record(z.string(), posInt).nullish(),
    alpha_pattern: z.record(z.string(), z.number().positive()).nullish(),
    layers_to_transform: z
      .union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())])
      .nullish(),
    layers_pattern: stringOrList.nullish(),
    fan_in_fan_out: z.boolean().nullish(),
    bias: z.string().nullish(),
    use_dora: z.boolean().nullish(),
    modules_to_save: z.array(z.string()).nullish(),
    feedforward_modules: stringOrList.nullish(),
    num_virtual_tokens: posInt.nullish(),
    token_dim: posInt.nullish(),
    num_layers: posInt.nullish(),
    num_attention_heads: posInt.nullish(),
    num_transformer_submodules: posInt.nullish(),
    encoder_hidden_size: posInt.nullish(),
    encoder_reparameterization_type: z.string().nullish(),
    encoder_num_layers: posInt.nullish(),
    prefix_projection: z.boolean().nullish(),
  })
  .loose();

/** The regex PEFT's `get_pattern_key` builds from a rank_pattern / alpha_pattern key. */
export const suffixPattern = (key: string): string => `^(?:.*\\.)?(?:${key})$`;

function checkPatterns(file: string, c: z.infer<typeof schema>): void {
  const full = (s: string) => `^(?:${s})$`;
  if (typeof c.target_modules === "string") compilePattern(file, "target_modules", c.target_modules, full);
  if (typeof c.exclude_modules === "string") compilePattern(file, "exclude_modules", c.exclude_modules, full);
  if (typeof c.feedforward_modules === "string")
    compilePattern(file, "feedforward_modules", c.feedforward_modules, full);
  for (const field of ["rank_pattern", "alpha_pattern"] as const) {
    for (const key of Object.keys(c[field] ?? {}))
      compilePattern(file, `${field}.${key}`, key, suffixPattern);
  }
}

/** Validate a parsed adapter_config.json. An unknown peft_type is `adapter_incompatible` naming it. */
export function parsePeftConfig(json: unknown, file: string): PeftConfig {
  const parsed = schema.safeParse(json);
  if (!parsed.success) throw loadFailed(file, zodIssue(parsed.error));
  const c = parsed.data;
  if (!(PEFT_TYPES as readonly string[]).includes(c.peft_type)) {
    throw incompatible(
      file,
      `peft_type ${JSON.stringify(c.peft_type)} is not supported (supported: ${[...PEFT_TYPES, BOTTLENECK_PEFT_TYPE].join(", ")})`,
    );
  }
  checkPatterns(file, c);
  const encoderType = c.encoder_reparameterization_type?.toUpperCase() ?? null;
  if (encoderType !== null && encoderType !== "MLP" && encoderType !== "LSTM") {
    throw incompatible(
      file,
      `encoder_reparameterization_type ${JSON.stringify(c.encoder_reparameterization_type)} is not supported (MLP, LSTM)`,
    );
  }
  const list = (v: string | string[] | null | undefined) => (v === null || v === undefined ? null : v);
  const ltt = c.layers_to_transform;
  return {
    file,
    peftType: c.peft_type as PeftType,
    taskType: c.task_type ?? null,
    baseModelNameOrPath: c.base_model_name_or_path ?? null,
    r: c.r ?? 8,
    loraAlpha: c.lora_alpha ?? 8,
    useRslora: c.use_rslora ?? false,
    targetModules: list(c.target_modules),
    excludeModules: list(c.exclude_modules),
    rankPattern: c.rank_pattern ?? {},
    alphaPattern: c.alpha_pattern ?? {},
    layersToTransform: ltt === null || ltt === undefined ? null : typeof ltt === "number" ? [ltt] : ltt,
    layersPattern:
      c.layers_pattern === null || c.layers_pattern === undefined ? null : [c.layers_pattern].flat(),
    fanInFanOut: c.fan_in_fan_out ?? false,
    bias: c.bias ?? "none",
    useDora: c.use_dora ?? false,
    modulesToSave: c.modules_to_save ?? [],
    feedforwardModules: list(c.feedforward_modules),
    numVirtualTokens: c.num_virtual_tokens ?? null,
    tokenDim: c.token_dim ?? null,
    numLayers: c.num_layers ?? null,
    numAttentionHeads: c.num_attention_heads ?? null,
    numTransformerSubmodules: c.num_transformer_submodules ?? null,
    encoderHiddenSize: c.encoder_hidden_size ?? null,
    encoderReparameterizationType: encoderType as "MLP" | "LSTM" | null,
    encoderNumLayers: c.encoder_num_layers ?? null,
    prefixProjection: c.prefix_projection ?? false,
    raw: json as Record<string, unknown>,
  };
}

export function readPeftConfig(file: string): PeftConfig {
  return parsePeftConfig(readJsonFile(file), file);
}

/** Features of a LoRA/IA3 config taskmux does not serve, each named. */
export function rejectUnsupportedFeatures(config: PeftConfig): void {
  const { file, raw } = config;
  if (config.useDora) throw incompatible(file, "use_dora = true (DoRA) is not supported");
  if (config.modulesToSave.length > 0) {
    throw incompatible(
      file,
      `modules_to_save ${JSON.stringify(config.modulesToSave)} is not supported (it replaces base weights)`,
    );
  }
  if (config.bias !== "none")
    throw incompatible(file, `bias = ${JSON.stringify(config.bias)} is not supported (only "none")`);
  const unsupported: [string, (v: unknown) => boolean][] = [
    ["lora_bias", (v) => v === true],
    ["layer_replication", (v) => v !== null && v !== undefined],
    ["trainable_token_indices", (v) => v !== null && v !== undefined],
    ["alora_invocation_tokens", (v) => v !== null && v !== undefined],
    ["target_parameters", (v) => Array.isArray(v) && v.length > 0],
  ];
  for (const [key, isSet] of unsupported) {
    if (isSet(raw[key])) throw incompatible(file, `${key} = ${JSON.stringify(raw[key])} is not supported`);
  }
  if (config.taskType === "SEQ_2_SEQ_LM")
    throw incompatible(file, "task_type SEQ_2_SEQ_LM is not supported (taskmux serves causal LMs)");
}
