/**
 * @module http/choices — one choice's EngineEvents → pieces of OpenAI output (text or delta content, logprobs,
 * finish_reason). Streaming sends each piece as a chunk; a plain response concatenates them, so both agree.
 */
import type { EngineEvent, FinishReason, Usage } from "../engine/events.ts";
import type { GenerationService } from "../engine/service.ts";
import {
  appendLegacyLogprobs,
  type ChatTokenLogprob,
  chatTokenLogprob,
  emptyLegacyLogprobs,
  type LegacyLogprobs,
  promptLegacyLogprobs,
  tokenLegacyLogprobs,
} from "./logprobs.ts";

export interface CompletionPiece {
  text: string;
  logprobs: LegacyLogprobs | null;
  finishReason: FinishReason | null;
}

export interface CompletionChoiceOptions {
  /** Prompt text to return before the completion (`echo`), or null. */
  echoText: string | null;
  /** Generated-token logprobs were requested. */
  logprobs: boolean;
  /** The prompt's own logprobs were requested (echo + logprobs): the echo piece waits for them. */
  promptLogprobs: boolean;
}

/** Tracks one completion choice's text length so `text_offset` is right in streamed and plain responses. */
export class CompletionChoice {
  private textLength = 0;
  private echoPending: boolean;
  usage: Usage | null = null;

  constructor(
    private readonly service: GenerationService,
    private readonly options: CompletionChoiceOptions,
  ) {
    this.echoPending = options.echoText !== null;
  }

  /** Pieces for one event; throws the error of an error event. */
  onEvent(event: EngineEvent): CompletionPiece[] {
    if (event.type === "error") throw event.error;
    if (event.type === "prompt_logprobs") {
      if (!this.echoPending) return [];
      const echo = this.options.echoText!;
      const logprobs = this.options.promptLogprobs
        ? promptLegacyLogprobs(this.service, event, echo.length)
        : null;
      return [this.echo(logprobs)];
    }
    // The echo goes first even if the prompt logprobs never came.
    const pieces = this.echoPending ? [this.echo(this.options.logprobs ? emptyLegacyLogprobs() : null)] : [];
    if (event.type === "token") {
      const logprobs = this.options.logprobs
        ? tokenLegacyLogprobs(this.service, event, this.textLength)
        : null;
      this.textLength += event.text.length;
      if (event.text !== "" || logprobs) pieces.push({ text: event.text, logprobs, finishReason: null });
    } else {
      this.usage = event.usage;
      this.textLength += event.text.length;
      pieces.push({ text: event.text, logprobs: null, finishReason: event.reason });
    }
    return pieces;
  }

  /** The echo without waiting for an event (when no prompt logprobs will come). */
  begin(): CompletionPiece[] {
    return this.echoPending && !this.options.promptLogprobs ? [this.echo(null)] : [];
  }

  private echo(logprobs: LegacyLogprobs | null): CompletionPiece {
    this.echoPending = false;
    const text = this.options.echoText!;
    this.textLength += text.length;
    return { text, logprobs, finishReason: null };
  }
}

/** A plain (non-streamed) completion choice from all of its pieces. */
export function joinCompletionPieces(pieces: readonly CompletionPiece[], wantLogprobs: boolean) {
  const logprobs = wantLogprobs ? emptyLegacyLogprobs() : null;
  for (const piece of pieces) if (logprobs && piece.logprobs) appendLegacyLogprobs(logprobs, piece.logprobs);
  const finish = pieces.findLast((p) => p.finishReason !== null);
  return { text: pieces.map((p) => p.text).join(""), logprobs, finishReason: finish?.finishReason ?? null };
}

export interface ChatPiece {
  content: string;
  logprobs: ChatTokenLogprob[] | null;
  finishReason: FinishReason | null;
}

/** One chat choice's pieces (chat has no echo and no prompt logprobs). */
export class ChatChoice {
  usage: Usage | null = null;

  constructor(
    private readonly service: GenerationService,
    private readonly wantLogprobs: boolean,
  ) {}

  onEvent(event: EngineEvent): ChatPiece[] {
    if (event.type === "error") throw event.error;
    if (event.type === "prompt_logprobs") return [];
    if (event.type === "finished") {
      this.usage = event.usage;
      return [{ content: event.text, logprobs: null, finishReason: event.reason }];
    }
    const logprobs = this.wantLogprobs ? [chatTokenLogprob(this.service, event)] : null;
    return event.text === "" && !logprobs ? [] : [{ content: event.text, logprobs, finishReason: null }];
  }
}

export function joinChatPieces(pieces: readonly ChatPiece[], wantLogprobs: boolean) {
  const content = wantLogprobs ? pieces.flatMap((p) => p.logprobs ?? []) : null;
  const finish = pieces.findLast((p) => p.finishReason !== null);
  return {
    content: pieces.map((p) => p.content).join(""),
    logprobs: content ? { content } : null,
    finishReason: finish?.finishReason ?? null,
  };
}

/** OpenAI usage: prompt tokens once per prompt (choices of one prompt share it), completion tokens per choice. */
export function sumUsage(usages: readonly (Usage | null)[], promptOf: (choice: number) => number) {
  const promptTokens = new Map<number, number>();
  let completionTokens = 0;
  usages.forEach((usage, choice) => {
    if (!usage) return;
    promptTokens.set(promptOf(choice), usage.promptTokens);
    completionTokens += usage.completionTokens;
  });
  const prompt = [...promptTokens.values()].reduce((a, b) => a + b, 0);
  return {
    prompt_tokens: prompt,
    completion_tokens: completionTokens,
    total_tokens: prompt + completionTokens,
  };
}
