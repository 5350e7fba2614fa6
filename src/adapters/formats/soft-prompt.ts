/**
 * @module adapters/formats/soft-prompt — virtual-token tables [numVirtualTokens, hidden] from PEFT
 * PROMPT_TUNING and P_TUNING folders (safetensors key `prompt_embeddings`, which for P_TUNING PEFT saves
 * already passed through the encoder), from a p-tuning prompt encoder checkpoint (run once here by
 * prompt-encoder.ts), or from our `soft_prompt.safetensors` beside a LoRA/IA3/bottleneck adapter.
 */
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import { expectFinite, incompatible, loadFailed, readTensorFile, shapeText } from "./format-shared.ts";
import type { PeftConfig } from "./peft-config.ts";
import { evaluatePromptEncoder, promptEncoderTensors } from "./prompt-encoder.ts";

export type SoftPromptSource = "prompt_tuning" | "p_tuning" | "p_tuning_encoder";

export interface SoftPrompt {
  /** [numVirtualTokens, hidden], row-major. */
  rows: Float32Array;
  numVirtualTokens: number;
  source: SoftPromptSource;
}

export const PROMPT_EMBEDDINGS = "prompt_embeddings";

/** Check a `prompt_embeddings` tensor: [n, hidden], n as the config says, finite, short enough to serve. */
export function promptEmbeddingRows(
  file: string,
  tensor: FloatTensor,
  spec: ModelSpec,
  expectedRows: number | null,
): { rows: Float32Array; numVirtualTokens: number } {
  const s = tensor.shape;
  if (s.length !== 2)
    throw loadFailed(
      file,
      `tensor ${PROMPT_EMBEDDINGS} has shape ${shapeText(s)}, expected [num_virtual_tokens, ${spec.hiddenSize}]`,
    );
  const [n, width] = s as [number, number];
  if (width !== spec.hiddenSize) {
    throw incompatible(
      file,
      `tensor ${PROMPT_EMBEDDINGS} has shape ${shapeText(s)}, expected [${n}, ${spec.hiddenSize}] (the base's hidden size)`,
    );
  }
  if (n === 0) throw loadFailed(file, `tensor ${PROMPT_EMBEDDINGS} has no rows`);
  if (expectedRows !== null && n !== expectedRows) {
    throw loadFailed(
      file,
      `tensor ${PROMPT_EMBEDDINGS} has shape ${shapeText(s)}, expected [${expectedRows}, ${spec.hiddenSize}] (num_virtual_tokens = ${expectedRows})`,
    );
  }
  if (n >= spec.maxPositionEmbeddings) {
    throw incompatible(
      file,
      `${n} virtual tokens leave no room in the base's ${spec.maxPositionEmbeddings} positions`,
    );
  }
  expectFinite(file, PROMPT_EMBEDDINGS, tensor.data, width);
  return { rows: tensor.data, numVirtualTokens: n };
}

function checkPromptConfig(config: PeftConfig, spec: ModelSpec): void {
  if (config.taskType === "SEQ_2_SEQ_LM" || (config.numTransformerSubmodules ?? 1) !== 1) {
    throw incompatible(
      config.file,
      "prompt learning for encoder-decoder models (num_transformer_submodules = 2) is not supported",
    );
  }
  if (config.tokenDim !== null && config.tokenDim !== spec.hiddenSize) {
    throw incompatible(
      config.file,
      `token_dim ${config.tokenDim} does not match the base's hidden size ${spec.hiddenSize}`,
    );
  }
}

/** A PROMPT_TUNING / P_TUNING `adapter_model.safetensors` (or, with `config` null, our soft_prompt.safetensors). */
export function parseSoftPrompt(
  tensors: Map<string, FloatTensor>,
  file: string,
  config: PeftConfig | null,
  spec: ModelSpec,
): SoftPrompt {
  if (config) checkPromptConfig(config, spec);
  const expectedRows = config?.numVirtualTokens ?? null;
  const table = tensors.get(PROMPT_EMBEDDINGS);
  if (table) {
    const extra = [...tensors.keys()].find((k) => k !== PROMPT_EMBEDDINGS);
    if (extra !== undefined) throw loadFailed(file, `unexpected tensor ${extra} beside ${PROMPT_EMBEDDINGS}`);
    const source = config?.peftType === "P_TUNING" ? "p_tuning" : "prompt_tuning";
    return { ...promptEmbeddingRows(file, table, spec, expectedRows), source };
  }
  if (config?.peftType !== "P_TUNING") throw loadFailed(file, `tensor ${PROMPT_EMBEDDINGS} is missing`);
  const encoder = promptEncoderTensors(file, tensors);
  if (!encoder)
    throw loadFailed(
      file,
      `holds neither ${PROMPT_EMBEDDINGS} nor a prompt encoder (embedding.weight + mlp_head / lstm_head)`,
    );
  const rows = evaluatePromptEncoder(file, encoder, config, spec);
  const numVirtualTokens = rows.length / spec.hiddenSize;
  if (numVirtualTokens >= spec.maxPositionEmbeddings) {
    throw incompatible(
      file,
      `${numVirtualTokens} virtual tokens leave no room in the base's ${spec.maxPositionEmbeddings} positions`,
    );
  }
  return { rows, numVirtualTokens, source: "p_tuning_encoder" };
}

export function loadSoftPrompt(file: string, config: PeftConfig | null, spec: ModelSpec): SoftPrompt {
  return parseSoftPrompt(readTensorFile(file), file, config, spec);
}
