/** @module engine/events — what a request sees of its sequence: token, prompt_logprobs, finished, error. */
import type { TaskmuxError } from "../errors.ts";
import type { TokenLogprob } from "./sampler.ts";

export type FinishReason = "stop" | "length" | "cancelled";

export interface Usage {
  promptTokens: number;
  completionTokens: number;
}

/** One sampled token with its share of the output text (may be "" while bytes or a stop match are pending). */
export interface TokenEvent {
  type: "token";
  tokenId: number;
  text: string;
  /** Present when the request asked for logprobs. */
  logprob?: number;
  topLogprobs?: TokenLogprob[];
}

/** Log-probabilities of the prompt's own tokens (echo + logprobs scoring); the first entry has none. */
export interface PromptLogprobsEvent {
  type: "prompt_logprobs";
  entries: { tokenId: number; logprob: number | null; topLogprobs: TokenLogprob[] }[];
}

export interface FinishedEvent {
  type: "finished";
  reason: FinishReason;
  /** Text held back until the end (partial UTF-8 or a partial stop-string match that never completed). */
  text: string;
  usage: Usage;
}

export interface ErrorEvent {
  type: "error";
  error: TaskmuxError;
  usage: Usage;
}

export type EngineEvent = TokenEvent | PromptLogprobsEvent | FinishedEvent | ErrorEvent;

/** Unbounded single-consumer queue exposed as an AsyncIterable; ends after a finished/error event. */
export class EventChannel implements AsyncIterable<EngineEvent> {
  private readonly buffer: EngineEvent[] = [];
  private wake: (() => void) | null = null;
  private closed = false;

  push(event: EngineEvent): void {
    if (this.closed) return;
    this.buffer.push(event);
    if (event.type === "finished" || event.type === "error") this.closed = true;
    this.wake?.();
    this.wake = null;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<EngineEvent> {
    for (;;) {
      while (this.buffer.length > 0) {
        const event = this.buffer.shift()!;
        yield event;
        if (event.type === "finished" || event.type === "error") return;
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }
}
