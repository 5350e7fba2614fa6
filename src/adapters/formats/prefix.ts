/**
 * @module adapters/formats/prefix — PEFT PREFIX_TUNING `prompt_embeddings` [n, numLayers * 2 * KVH * HS]
 * -> per-layer keys and values [KVH, n, HS], which the engine puts in the KV cache before the prompt.
 *
 * PEFT `PeftModel.get_prompt`: past_key_values = prompt_embeddings.view(B, n, L * 2, heads, token_dim / heads)
 * .permute([2, 0, 3, 1, 4]).split(2), so layer l's key is slice 2l and its value slice 2l + 1 of the L * 2 axis.
 * `_prepare_prompt_learning_config` sets heads = num_key_value_heads and token_dim = KVH * head_dim when the base
 * config has num_key_value_heads (PEFT #1901, grouped-query attention), so each row is L * 2 * KVH * HS wide.
 * The stored rows are used as-is: PEFT adds no RoPE to prefix keys.
 *
 * `prefix_projection: true` is accepted: PEFT saves `prompt_embeddings` as the projection's output
 * (`get_prompt_embedding_to_save` runs the PrefixEncoder) and serves it directly in inference mode, so the
 * file holds the same [n, L * 2 * KVH * HS] table either way.
 */
import type { ModelSpec } from "../../model/model-spec.ts";
import type { FloatTensor } from "../../model/safetensors.ts";
import { expectFinite, incompatible, loadFailed, readTensorFile, shapeText } from "./format-shared.ts";
import type { PeftConfig } from "./peft-config.ts";
import { PROMPT_EMBEDDINGS } from "./soft-prompt.ts";

export interface PrefixKv {
  /** Virtual tokens n (cache positions 0..n-1). */
  length: number;
  /** Per layer [KVH, n, HS]. */
  keys: Float32Array[];
  /** Per layer [KVH, n, HS]. */
  values: Float32Array[];
}

function checkPrefixConfig(config: PeftConfig, spec: ModelSpec): void {
  const { file } = config;
  if (config.taskType === "SEQ_2_SEQ_LM" || (config.numTransformerSubmodules ?? 1) !== 1) {
    throw incompatible(
      file,
      "prefix tuning for encoder-decoder models (num_transformer_submodules = 2) is not supported",
    );
  }
  if (config.numLayers !== null && config.numLayers !== spec.numLayers) {
    throw incompatible(
      file,
      `num_layers ${config.numLayers} does not match the base's ${spec.numLayers} layers`,
    );
  }
  const heads = config.numAttentionHeads;
  if (heads !== null && heads !== spec.numKvHeads) {
    const why =
      heads === spec.numHeads
        ? " (it counts query heads: this adapter was made by a PEFT version without grouped-query attention support)"
        : "";
    throw incompatible(
      file,
      `num_attention_heads ${heads} does not match the base's ${spec.numKvHeads} key/value heads${why}`,
    );
  }
  const kvWidth = spec.numKvHeads * spec.headDim;
  if (config.tokenDim !== null && config.tokenDim !== kvWidth) {
    throw incompatible(
      file,
      `token_dim ${config.tokenDim} does not match the base's key/value width ${kvWidth} (${spec.numKvHeads} heads x ${spec.headDim})`,
    );
  }
}

/** Validate a PREFIX_TUNING table and split it into per-layer keys and values. */
export function parsePrefix(
  tensors: Map<string, FloatTensor>,
  file: string,
  config: PeftConfig,
  spec: ModelSpec,
): PrefixKv {
  checkPrefixConfig(config, spec);
  const t = tensors.get(PROMPT_EMBEDDINGS);
  if (!t) throw loadFailed(file, `tensor ${PROMPT_EMBEDDINGS} is missing`);
  const extra = [...tensors.keys()].find((k) => k !== PROMPT_EMBEDDINGS);
  if (extra !== undefined) throw loadFailed(file, `unexpected tensor ${extra} beside ${PROMPT_EMBEDDINGS}`);
  const { numLayers: L, numKvHeads: KVH, headDim: HS } = spec;
  const width = L * 2 * KVH * HS;
  if (t.shape.length !== 2 || t.shape[1] !== width) {
    throw incompatible(
      file,
      `tensor ${PROMPT_EMBEDDINGS} has shape ${shapeText(t.shape)}, expected [n, ${width}] (${L} layers x 2 x ${KVH} key/value heads x ${HS})`,
    );
  }
  const n = t.shape[0]!;
  if (n === 0) throw loadFailed(file, `tensor ${PROMPT_EMBEDDINGS} has no rows`);
  if (config.numVirtualTokens !== null && config.numVirtualTokens !== n) {
    throw loadFailed(
      file,
      `tensor ${PROMPT_EMBEDDINGS} has shape ${shapeText(t.shape)}, expected [${config.numVirtualTokens}, ${width}] (num_virtual_tokens)`,
    );
  }
  if (n >= spec.maxPositionEmbeddings) {
    throw incompatible(
      file,
      `a ${n}-token prefix leaves no room in the base's ${spec.maxPositionEmbeddings} positions`,
    );
  }
  expectFinite(file, PROMPT_EMBEDDINGS, t.data, width);
  const keys = Array.from({ length: L }, () => new Float32Array(KVH * n * HS));
  const values = Array.from({ length: L }, () => new Float32Array(KVH * n * HS));
  for (let tok = 0; tok < n; tok++) {
    for (let j = 0; j < 2 * L; j++) {
      const target = (j % 2 === 0 ? keys : values)[j >> 1]!;
      for (let h = 0; h < KVH; h++) {
        const src = ((tok * 2 * L + j) * KVH + h) * HS;
        target.set(t.data.subarray(src, src + HS), (h * n + tok) * HS);
      }
    }
  }
  return { length: n, keys, values };
}

export function loadPrefix(file: string, config: PeftConfig, spec: ModelSpec): PrefixKv {
  return parsePrefix(readTensorFile(file), file, config, spec);
}
