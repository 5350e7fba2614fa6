/** @module engine/detokenizer — generated ids -> text, one token at a time, never half a character. */
import type { TextTokenizer } from "../model/tokenizer.ts";

export interface DetokenizerOptions {
  /** Leave special tokens (`<|im_end|>`, `</s>`) out of the text, as OpenAI-style servers do. Default true. */
  skipSpecialTokens?: boolean;
}

/**
 * Replaying this many byte-contributing prompt tokens is enough: an unfinished UTF-8 character is at most 3
 * bytes, so its lead byte lies in the last 3 of them (one more for margin).
 */
const PROMPT_TAIL = 4;

/**
 * Assembles each token's exact bytes (TextTokenizer.tokenBytes) and decodes them with a streaming UTF-8
 * decoder, so each push is O(token length) and an unfinished character stays held until its bytes arrive.
 * This reproduces `decode` exactly: byte-level and byte-fallback bytes join across tokens, an added token
 * closes any unfinished bytes before it (decoders handle added tokens on their own), and SentencePiece's
 * start-of-text space strip applies only when nothing — prompt included — has produced text yet, so the
 * result equals decode(prompt + generated) with the prompt's own text removed.
 */
export class IncrementalDetokenizer {
  private readonly decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
  private readonly skipSpecial: boolean;
  private stripRemaining: number;
  private output = "";

  constructor(
    private readonly tokenizer: TextTokenizer,
    promptIds: readonly number[] = [],
    options: DetokenizerOptions = {},
  ) {
    this.skipSpecial = options.skipSpecialTokens ?? true;
    this.stripRemaining = tokenizer.stripLeadingSpaces;
    this.replayPrompt(promptIds);
  }

  /** All text emitted so far. */
  get text(): string {
    return this.output;
  }

  /** Adds one generated id; returns the text it completes (possibly ""). */
  push(id: number): string {
    return this.emit(this.consume(id));
  }

  /** Ends the stream: bytes still waiting for the rest of a character become U+FFFD. */
  flush(): string {
    return this.emit(this.stripStart(this.decoder.decode()));
  }

  private emit(text: string): string {
    this.output += text;
    return text;
  }

  private consume(id: number): string {
    if (this.skipSpecial && this.tokenizer.isSpecial(id)) return "";
    const bytes = this.tokenizer.tokenBytes(id);
    if (bytes === null) return "";
    if (!this.tokenizer.isAdded(id)) return this.stripStart(this.decoder.decode(bytes, { stream: true }));
    // Added tokens are decoded apart from their neighbours: finish pending bytes (as U+FFFD) first.
    const pending = this.decoder.decode();
    return this.stripStart(pending + this.decoder.decode(bytes));
  }

  /** SentencePiece decoders drop leading spaces of the whole text; track how many may still go. */
  private stripStart(text: string): string {
    let start = 0;
    while (this.stripRemaining > 0 && start < text.length) {
      if (text[start] !== " ") {
        this.stripRemaining = 0;
        break;
      }
      start++;
      this.stripRemaining--;
    }
    return start === 0 ? text : text.slice(start);
  }

  /** Brings decoder state (unfinished bytes, start-of-text strip) to where the prompt leaves it; output dropped. */
  private replayPrompt(promptIds: readonly number[]): void {
    let tailStart = promptIds.length;
    for (let seen = 0; tailStart > 0 && seen < PROMPT_TAIL; ) {
      if (this.contributes(promptIds[--tailStart]!)) seen++;
    }
    // Text before the tail means the start-of-text strip is spent (exact for the one-space strip SentencePiece
    // tokenizers use).
    for (let i = 0; i < tailStart && this.stripRemaining > 0; i++) {
      if (this.contributes(promptIds[i]!)) this.stripRemaining = 0;
    }
    for (let i = tailStart; i < promptIds.length; i++) this.consume(promptIds[i]!);
  }

  private contributes(id: number): boolean {
    if (this.skipSpecial && this.tokenizer.isSpecial(id)) return false;
    return (this.tokenizer.tokenBytes(id)?.length ?? 0) > 0;
  }
}
