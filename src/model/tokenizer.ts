/** @module model/tokenizer — one model's tokenizer: encode/decode as HF does, special tokens, token bytes, chat template. */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Template } from "@huggingface/jinja";
import { Tokenizer } from "@huggingface/tokenizers";
import { invalidRequest, unsupportedModel } from "../errors.ts";

export interface ChatMessage {
  role: string;
  content: string;
}

/**
 * GPT-2's bytes_to_unicode: byte -> the printable character that stands for it in byte-level vocabularies.
 * Insertion order is GPT-2's order (the printable bytes first), which is also the id order of the 256 base
 * symbols in GPT-2-style vocabularies.
 */
export const BYTES_TO_UNICODE: ReadonlyMap<number, string> = buildBytesToUnicode();
const UNICODE_TO_BYTE: ReadonlyMap<string, number> = new Map([...BYTES_TO_UNICODE].map(([b, c]) => [c, b]));

function buildBytesToUnicode(): Map<number, string> {
  const printable = (from: string, to: string) =>
    Array.from({ length: to.charCodeAt(0) - from.charCodeAt(0) + 1 }, (_, i) => from.charCodeAt(0) + i);
  const bytes = [...printable("!", "~"), ...printable("¡", "¬"), ...printable("®", "ÿ")];
  const map = new Map<number, string>(bytes.map((b) => [b, String.fromCharCode(b)]));
  let next = 256;
  for (let b = 0; b < 256; b++) if (!map.has(b)) map.set(b, String.fromCharCode(next++));
  return map;
}

/**
 * Special tokens (besides `eos_token`) that end a turn or a document in widely used chat formats. A generated
 * one of these means "stop" for any request: llama.cpp's end-of-generation list does the same.
 */
const END_OF_TURN_TOKENS: ReadonlySet<string> = new Set([
  "</s>",
  "<|endoftext|>",
  "<|im_end|>",
  "<|eot_id|>",
  "<|eom_id|>",
  "<|end|>",
  "<end_of_turn>",
]);

/** How `decode` turns token strings into text, reduced to what an incremental decoder needs to know. */
interface DecodeRules {
  /** Byte-level (GPT-2): every character of a vocabulary token stands for one byte. */
  byteLevel: boolean;
  /** SentencePiece byte fallback: `<0xE2>` is the single byte 0xE2. */
  byteFallback: boolean;
  /** Plain string replacements applied to each token, in order (SentencePiece: `▁` -> space). */
  replacements: [string, string][];
  /** How many leading spaces the decoder strips from the very start of the text. */
  stripLeadingSpaces: number;
}

type Json = Record<string, unknown>;

export class TextTokenizer {
  /** Largest id + 1, added tokens included. */
  readonly vocabSize: number;
  readonly bosId: number | null;
  /** Ids that end generation: `eos_token`, generation_config's `eos_token_id`(s), and special end-of-turn tokens. */
  readonly eosIds: number[];
  /** Whether `encode(text)` (special tokens on) starts with BOS, as HF `tokenizer(text)` does. */
  readonly addBosToken: boolean;
  readonly hasChatTemplate: boolean;
  /** Leading spaces `decode` drops at the start of a text (SentencePiece `Strip`/`Metaspace`); 0 for byte-level. */
  readonly stripLeadingSpaces: number;

  private readonly specialIds: ReadonlySet<number>;
  private readonly addedIds: ReadonlySet<number>;
  private readonly bytesCache: (Uint8Array | undefined)[] = [];
  private readonly utf8 = new TextEncoder();

  private constructor(
    private readonly hf: Tokenizer,
    private readonly config: Json,
    private readonly rules: DecodeRules,
    private readonly template: Template | null,
    /** Whether the tokenizer.json post-processor itself prepends BOS. */
    private readonly postProcessorAddsBos: boolean,
    generationEosIds: number[],
  ) {
    this.vocabSize = largestId(hf) + 1;
    this.bosId = tokenId(hf, config.bos_token);
    this.specialIds = specialTokenIds(hf, config);
    this.addedIds = new Set(hf.get_added_tokens_decoder().keys());
    // add_bos_token in tokenizer_config wins where it is given: transformers rebuilds the Llama post-processor
    // from it; otherwise the post-processor decides.
    const configured = config.add_bos_token;
    this.addBosToken =
      this.bosId !== null && (typeof configured === "boolean" ? configured : postProcessorAddsBos);
    this.eosIds = this.collectEosIds(generationEosIds);
    this.hasChatTemplate = template !== null;
    this.stripLeadingSpaces = rules.stripLeadingSpaces;
  }

  /** Reads `tokenizer.json` + `tokenizer_config.json` (and `generation_config.json`, `chat_template.jinja` if present). */
  static load(dir: string): TextTokenizer {
    const tokenizerJson = readJson(dir, "tokenizer.json", true)!;
    const config = readJson(dir, "tokenizer_config.json", true)!;
    const generation = readJson(dir, "generation_config.json", false);
    return TextTokenizer.fromJson(tokenizerJson, config, {
      generationEosIds: idList(generation?.eos_token_id),
      chatTemplate: readChatTemplateFile(dir),
    });
  }

  /** Builds from already-parsed files (the tokenizer maker and tests use this without touching disk). */
  static fromJson(
    tokenizerJson: object,
    tokenizerConfig: object,
    extra: { generationEosIds?: number[]; chatTemplate?: string | null } = {},
  ): TextTokenizer {
    const config = { ...(tokenizerConfig as Json) };
    // The library compares these as strings; HF also allows {content: ...} objects here.
    if (Array.isArray(config.additional_special_tokens)) {
      config.additional_special_tokens = config.additional_special_tokens.map(tokenContent).filter(Boolean);
    }
    let hf: Tokenizer;
    try {
      hf = new Tokenizer(tokenizerJson, config);
    } catch (error) {
      throw unsupportedModel(`tokenizer.json cannot be loaded: ${messageOf(error)}`, "tokenizer.json");
    }
    const rules = decodeRules((tokenizerJson as Json).decoder);
    const template = parseTemplate(extra.chatTemplate ?? templateSource(config.chat_template));
    const bos = tokenId(hf, config.bos_token);
    const probe = hf.encode("a", { add_special_tokens: true }).ids;
    const postAddsBos =
      bos !== null && probe[0] === bos && hf.encode("a", { add_special_tokens: false }).ids[0] !== bos;
    return new TextTokenizer(hf, config, rules, template, postAddsBos, extra.generationEosIds ?? []);
  }

  encode(text: string, { addSpecialTokens = true }: { addSpecialTokens?: boolean } = {}): number[] {
    // Typed here: the package's .d.ts leaves `Encoding` unresolved under NodeNext.
    const ids: number[] = this.hf.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    if (!addSpecialTokens || this.addBosToken === this.postProcessorAddsBos) return ids;
    return this.addBosToken ? [this.bosId!, ...ids] : ids.slice(1);
  }

  /** As HF `decode`: ids outside the vocabulary (embedding padding rows) are dropped; no space clean-up unless configured. */
  decode(
    ids: readonly number[],
    { skipSpecialTokens = false }: { skipSpecialTokens?: boolean } = {},
  ): string {
    const known = ids.filter((id) => this.hf.id_to_token(id) !== undefined);
    if (known.length === 0) return "";
    return this.hf.decode(known, {
      skip_special_tokens: skipSpecialTokens,
      clean_up_tokenization_spaces: this.config.clean_up_tokenization_spaces === true,
    });
  }

  /** The raw vocabulary string (`Ġthe`, `▁the`, `<0x0A>`); "" for an id outside the vocabulary. */
  tokenString(id: number): string {
    return this.hf.id_to_token(id) ?? "";
  }

  /** The id of a vocabulary string (`<|im_end|>`, `<0x0A>`), or null. */
  tokenId(token: string): number | null {
    return this.hf.token_to_id(token) ?? null;
  }

  /**
   * The exact bytes this token contributes to decoded text before the decoder's start-of-text space strip;
   * a special token contributes its own text (callers skip it when they skip special tokens). Null for an id
   * outside the vocabulary.
   */
  tokenBytes(id: number): Uint8Array | null {
    const cached = this.bytesCache[id];
    if (cached !== undefined) return cached;
    const token = this.hf.id_to_token(id);
    const bytes = token === undefined ? null : this.computeBytes(token, this.addedIds.has(id));
    if (bytes !== null) this.bytesCache[id] = bytes;
    return bytes;
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  /** Added tokens are decoded on their own: bytes pending before one are not joined with bytes after it. */
  isAdded(id: number): boolean {
    return this.addedIds.has(id);
  }

  applyChatTemplate(messages: readonly ChatMessage[], { addGenerationPrompt = true } = {}): string {
    if (this.template === null) {
      throw invalidRequest("this model has no chat template; use /v1/completions instead", "messages");
    }
    const specials: Record<string, string> = {};
    for (const name of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      const content = tokenContent(this.config[name]);
      if (content !== null) specials[name] = content;
    }
    try {
      return this.template.render({ ...specials, messages, add_generation_prompt: addGenerationPrompt });
    } catch (error) {
      throw invalidRequest(
        `the chat template could not render these messages: ${messageOf(error)}`,
        "messages",
      );
    }
  }

  private computeBytes(token: string, added: boolean): Uint8Array {
    const { byteLevel, byteFallback, replacements } = this.rules;
    if (byteLevel) {
      // The byte-level decoder passes added tokens through as text; everything else is one byte per character.
      if (added) return this.utf8.encode(token);
      const chars = [...token];
      if (chars.every((c) => UNICODE_TO_BYTE.has(c)))
        return Uint8Array.from(chars, (c) => UNICODE_TO_BYTE.get(c)!);
      return this.utf8.encode(token);
    }
    const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(token);
    if (byteFallback && hex) return Uint8Array.of(Number.parseInt(hex[1]!, 16));
    let text = token;
    for (const [from, to] of replacements) text = text.replaceAll(from, to);
    return this.utf8.encode(text);
  }

  private collectEosIds(generationEosIds: number[]): number[] {
    const ids = [tokenId(this.hf, this.config.eos_token), ...generationEosIds];
    for (const id of this.specialIds) {
      if (END_OF_TURN_TOKENS.has(this.tokenString(id))) ids.push(id);
    }
    return [...new Set(ids.filter((id): id is number => id !== null && id < this.vocabSize))];
  }
}

/** Reduces a tokenizer.json decoder to DecodeRules; refuses decoders whose output is not a byte stream. */
function decodeRules(decoder: unknown): DecodeRules {
  const rules: DecodeRules = {
    byteLevel: false,
    byteFallback: false,
    replacements: [],
    stripLeadingSpaces: 0,
  };
  const steps = flattenDecoder(decoder);
  if (steps.length === 0) throw unsupportedDecoder("none");
  for (const step of steps) {
    switch (step.type) {
      case "ByteLevel":
        rules.byteLevel = true;
        break;
      case "ByteFallback":
        rules.byteFallback = true;
        break;
      case "Fuse":
        break;
      case "Replace": {
        const pattern = (step.pattern as Json | undefined)?.String;
        if (typeof pattern !== "string") throw unsupportedDecoder("Replace with a regex");
        rules.replacements.push([pattern, String(step.content ?? "")]);
        break;
      }
      case "Strip":
        if (Number(step.stop ?? 0) !== 0 || step.content !== " ")
          throw unsupportedDecoder("Strip at the end");
        rules.stripLeadingSpaces = Number(step.start ?? 0);
        break;
      case "Metaspace":
        rules.replacements.push([String(step.replacement ?? "▁"), " "]);
        rules.stripLeadingSpaces = 1;
        break;
      default:
        throw unsupportedDecoder(String(step.type));
    }
  }
  if (rules.byteLevel && steps.length > 1) throw unsupportedDecoder("ByteLevel combined with other decoders");
  return rules;
}

function flattenDecoder(decoder: unknown): Json[] {
  if (decoder === null || typeof decoder !== "object") return [];
  const d = decoder as Json;
  return d.type === "Sequence" ? (d.decoders as unknown[]).flatMap(flattenDecoder) : [d];
}

const unsupportedDecoder = (what: string) =>
  unsupportedModel(
    `tokenizer.json decoder is not supported (${what}): taskmux needs byte-level or SentencePiece-style decoding`,
    "tokenizer.json",
  );

/** A loop, not Math.max(...ids): spreading a 150k-entry vocabulary overflows the argument limit. */
function largestId(hf: Tokenizer): number {
  let max = -1;
  for (const id of hf.get_vocab(true).values()) if (id > max) max = id;
  return max;
}

function specialTokenIds(hf: Tokenizer, config: Json): Set<number> {
  const ids = new Set<number>();
  for (const [id, token] of hf.get_added_tokens_decoder()) if (token.special) ids.add(id);
  for (const content of (config.additional_special_tokens as string[] | undefined) ?? []) {
    const id = hf.token_to_id(content);
    if (id !== undefined) ids.add(id);
  }
  return ids;
}

/** tokenizer_config allows a token as a string or as `{content: ...}`. */
function tokenContent(value: unknown): string | null {
  if (typeof value === "string") return value;
  if (value !== null && typeof value === "object" && typeof (value as Json).content === "string") {
    return (value as Json).content as string;
  }
  return null;
}

function tokenId(hf: Tokenizer, value: unknown): number | null {
  const content = tokenContent(value);
  return content === null ? null : (hf.token_to_id(content) ?? null);
}

function idList(value: unknown): number[] {
  const list = Array.isArray(value) ? value : [value];
  return list.filter((v): v is number => Number.isInteger(v));
}

/** `chat_template` is a string, or a list of named templates of which HF uses "default". */
function templateSource(value: unknown): string | null {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    const named = value.find((t) => (t as Json)?.name === "default") as Json | undefined;
    return typeof named?.template === "string" ? named.template : null;
  }
  return null;
}

function parseTemplate(source: string | null): Template | null {
  if (source === null) return null;
  try {
    return new Template(source);
  } catch (error) {
    throw unsupportedModel(
      `the chat template cannot be parsed: ${messageOf(error)}`,
      "tokenizer_config.json",
    );
  }
}

/** Newer transformers save the template beside the config as chat_template.jinja; it wins when present. */
function readChatTemplateFile(dir: string): string | null {
  const path = join(dir, "chat_template.jinja");
  return existsSync(path) ? readFileSync(path, "utf8") : null;
}

function readJson(dir: string, name: string, required: boolean): Json | null {
  const path = join(dir, name);
  if (!existsSync(path)) {
    if (!required) return null;
    throw unsupportedModel(`${name} is missing from ${dir}`, name);
  }
  try {
    const value: unknown = JSON.parse(readFileSync(path, "utf8"));
    if (value === null || typeof value !== "object" || Array.isArray(value))
      throw new Error("not a JSON object");
    return value as Json;
  } catch (error) {
    throw unsupportedModel(`${name} in ${dir} is not valid: ${messageOf(error)}`, name);
  }
}

const messageOf = (error: unknown): string => (error instanceof Error ? error.message : String(error));
