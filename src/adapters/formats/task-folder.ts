/**
 * @module adapters/formats/task-folder — recognise a task folder by what it holds and load every part:
 *   task.json                  our task definition (template, system prompt, few-shot, defaults)   optional
 *   adapter_config.json        PEFT (LORA, IA3, PROMPT_TUNING, P_TUNING, PREFIX_TUNING) or ours    optional
 *   + adapter_model.safetensors  (BOTTLENECK); required with adapter_config.json
 *   soft_prompt.safetensors    `prompt_embeddings` [n, hidden]: virtual tokens added to a LoRA,     optional
 *                              IA3 or bottleneck task (or to a task.json alone)
 * The folder's name is the task name. The same layout is read from prompt-tables/ and adapters/.
 * Where the template places no virtual tokens the engine serves them as PEFT does (before the prompt).
 */
import { existsSync, statSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import type { AdapterPoolKind, BottleneckModuleWeights, LoraModuleWeights } from "../../model/contract.ts";
import type { ModelSpec } from "../../model/model-spec.ts";
import { loadBottleneck, parseBottleneckConfig } from "./bottleneck.ts";
import { incompatible, loadFailed, readJsonFile } from "./format-shared.ts";
import { loadIa3 } from "./ia3.ts";
import { loadLora } from "./lora.ts";
import { BOTTLENECK_PEFT_TYPE, type PeftConfig, parsePeftConfig } from "./peft-config.ts";
import { loadPrefix, type PrefixKv } from "./prefix.ts";
import { loadSoftPrompt, type SoftPrompt } from "./soft-prompt.ts";
import { parseTaskDefinition, type TaskDefinition } from "./task-definition.ts";

export const TASK_FILE = "task.json";
export const ADAPTER_CONFIG_FILE = "adapter_config.json";
export const ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors";
export const SOFT_PROMPT_FILE = "soft_prompt.safetensors";

export interface TaskLimits {
  maxLoraRank: number;
  maxBottleneckSize: number;
  /** The PEFT kinds the graph was built with (--peft); adapters of another kind are refused. Default: all. */
  peftKinds?: readonly AdapterPoolKind[];
}

export interface TaskParts {
  name: string;
  definition?: TaskDefinition;
  softPrompt?: SoftPrompt;
  prefix?: PrefixKv;
  lora?: { modules: Map<string, LoraModuleWeights>; rank: number };
  ia3?: Map<string, Float32Array>;
  bottleneck?: { modules: Map<string, BottleneckModuleWeights>; size: number };
  /** adapter_config.json's peft_type (BOTTLENECK for ours), or null without one. */
  peftType: string | null;
  /** Bytes of the files read. */
  sizeBytes: number;
  /** Names of the files read, relative to the folder. */
  files: string[];
}

const FOLDER_NAME = /^[A-Za-z0-9._-]{1,64}$/;

export function isValidFolderName(name: string): boolean {
  return FOLDER_NAME.test(name) && !name.startsWith(".");
}

function loadAdapter(
  dir: string,
  parts: TaskParts,
  spec: ModelSpec,
  limits: TaskLimits,
  read: (f: string) => string,
): void {
  const configFile = read(ADAPTER_CONFIG_FILE);
  const json = readJsonFile(configFile);
  const peftType = (json as { peft_type?: unknown } | null)?.peft_type;
  parts.peftType = typeof peftType === "string" ? peftType : null;
  if (!existsSync(join(dir, ADAPTER_WEIGHTS_FILE))) {
    const pickle = existsSync(join(dir, "adapter_model.bin"));
    if (pickle)
      throw incompatible(
        join(dir, "adapter_model.bin"),
        "PyTorch pickle weights are not supported; save with safe_serialization=True (adapter_model.safetensors)",
      );
    throw loadFailed(dir, `${ADAPTER_CONFIG_FILE} is there but ${ADAPTER_WEIGHTS_FILE} is missing`);
  }
  const served = (kind: AdapterPoolKind) => {
    const kinds = limits.peftKinds;
    if (kinds && !kinds.includes(kind))
      throw incompatible(
        configFile,
        `${parts.peftType} adapters need the ${kind} paths, which this server's graph was built without (--peft ${kinds.join(",") || "none"}); start it with --peft including ${kind}`,
      );
  };
  if (peftType === BOTTLENECK_PEFT_TYPE) {
    served("bottleneck");
    const config = parseBottleneckConfig(json, configFile, limits.maxBottleneckSize);
    parts.bottleneck = loadBottleneck(read(ADAPTER_WEIGHTS_FILE), config, spec);
    return;
  }
  const config: PeftConfig = parsePeftConfig(json, configFile);
  const weights = read(ADAPTER_WEIGHTS_FILE);
  switch (config.peftType) {
    case "LORA":
      served("lora");
      parts.lora = loadLora(weights, config, spec, limits.maxLoraRank);
      break;
    case "IA3":
      served("ia3");
      parts.ia3 = loadIa3(weights, config, spec);
      break;
    case "PROMPT_TUNING":
    case "P_TUNING":
      parts.softPrompt = loadSoftPrompt(weights, config, spec);
      break;
    case "PREFIX_TUNING":
      parts.prefix = loadPrefix(weights, config, spec);
      break;
  }
}

/** The template must place exactly the soft prompt's rows; fills in the splits of a single placeholder. */
function matchVirtualTokens(
  file: string,
  definition: TaskDefinition,
  softPrompt: SoftPrompt | undefined,
): TaskDefinition {
  const n = softPrompt?.numVirtualTokens ?? 0;
  if (definition.numPlaceholders > 0 && n === 0) {
    throw loadFailed(
      file,
      "prompt_template places <|VIRTUAL_PROMPT_n|> tokens, but the folder has no soft prompt",
    );
  }
  if (n > 0 && definition.numPlaceholders === 0) {
    throw loadFailed(
      file,
      `the folder's soft prompt has ${n} virtual tokens, but prompt_template has no <|VIRTUAL_PROMPT_0|> placeholder to put them`,
    );
  }
  if (n === 0) return definition;
  const splits = definition.virtualTokenSplits ?? [n];
  const total = splits.reduce((a, b) => a + b, 0);
  if (total !== n)
    throw loadFailed(
      file,
      `virtual_token_splits ${JSON.stringify(splits)} sum to ${total}, but the soft prompt has ${n} rows`,
    );
  return { ...definition, virtualTokenSplits: splits };
}

/**
 * Load the task in `dir` for this base. Throws TaskmuxError `adapter_load_failed` (unreadable or invalid
 * files) or `adapter_incompatible` (valid, but not for this base or an unsupported feature), naming the file.
 */
export function loadTaskFolder(dir: string, spec: ModelSpec, limits: TaskLimits): TaskParts {
  const root = resolve(dir);
  const name = basename(root);
  if (!isValidFolderName(name)) {
    throw loadFailed(
      root,
      `task folder name ${JSON.stringify(name)} must match [A-Za-z0-9._-]{1,64} and not start with "."`,
    );
  }
  if (!existsSync(root) || !statSync(root).isDirectory()) throw loadFailed(root, "is not a directory");
  const parts: TaskParts = { name, peftType: null, sizeBytes: 0, files: [] };
  const read = (file: string) => {
    const path = join(root, file);
    parts.files.push(file);
    parts.sizeBytes += statSync(path).size;
    return path;
  };
  const has = (file: string) => existsSync(join(root, file));
  if (!has(TASK_FILE) && !has(ADAPTER_CONFIG_FILE) && !has(SOFT_PROMPT_FILE)) {
    throw loadFailed(
      root,
      `holds neither ${TASK_FILE} nor ${ADAPTER_CONFIG_FILE} (nor ${SOFT_PROMPT_FILE}): not a task folder`,
    );
  }
  const definition = has(TASK_FILE)
    ? parseTaskDefinition(readJsonFile(read(TASK_FILE)), join(root, TASK_FILE))
    : undefined;
  if (has(ADAPTER_CONFIG_FILE)) loadAdapter(root, parts, spec, limits, read);
  if (has(SOFT_PROMPT_FILE)) {
    if (parts.softPrompt || parts.prefix) {
      throw loadFailed(
        join(root, SOFT_PROMPT_FILE),
        `the folder's ${parts.peftType} adapter is already a prompt-learning method; a task holds one soft prompt`,
      );
    }
    parts.softPrompt = loadSoftPrompt(read(SOFT_PROMPT_FILE), null, spec);
  }
  if (definition) parts.definition = matchVirtualTokens(join(root, TASK_FILE), definition, parts.softPrompt);
  return parts;
}
