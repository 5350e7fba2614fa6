/** @module engine/sequence — Sequence owns every piece of per-request state. */
import type { Rng } from "../model/maker/prng.ts";
import type { IncrementalDetokenizer } from "./detokenizer.ts";
import type { EventChannel } from "./events.ts";
import type { SamplingParams } from "./sampler.ts";
import type { SchedulableSequence } from "./scheduler.ts";
import type { StopStringMatcher } from "./stopping.ts";

export type SequenceStatus = "waiting" | "running" | "finished";

export interface GenerationParams extends SamplingParams {
  maxTokens: number;
  stop: string[];
  /** Keep generating past EOS (benchmarks). */
  ignoreEos: boolean;
  /** Top logprobs per generated token (null = no logprobs). */
  logprobs: number | null;
  /** Top logprobs per prompt token (echo scoring); null = none. */
  promptLogprobs: number | null;
  /** Wall-clock budget from arrival; past it the sequence ends with finish_reason "length". */
  deadlineMs: number | null;
  /** Extra ids that end this sequence (e.g. a chat template's end-of-turn token). */
  extraEosIds: number[];
}

/** Per-sequence adapter placement: a pool slot per PEFT kind (0 = identity) and soft-prompt rows. */
export interface SequenceAdapters {
  loraSlot: number;
  ia3Slot: number;
  bottleneckSlot: number;
  /** [n, D] rows addressed by prompt ids >= vocab */
  virtualTable?: Float32Array;
}

export class Sequence implements SchedulableSequence {
  status: SequenceStatus = "waiting";
  numComputedTokens = 0;
  readonly outputTokens: number[] = [];
  readonly arrivalMs = performance.now();
  firstTokenMs: number | null = null;
  lastTokenMs: number | null = null;
  /** Prefix-tuning positions seeded into the cache before the prompt (its tokens start at this position). */
  prefixLength = 0;
  /** Set by cancellation or deadline; the engine finishes the sequence at the next step boundary. */
  pendingFinish: "cancelled" | "length" | null = null;

  constructor(
    readonly id: number,
    readonly requestId: string,
    readonly promptTokens: readonly number[],
    readonly params: GenerationParams,
    readonly adapters: SequenceAdapters,
    readonly rng: Rng,
    readonly detokenizer: IncrementalDetokenizer,
    readonly stopMatcher: StopStringMatcher,
    readonly channel: EventChannel,
    /** Task name for metrics and logs (null = base model). */
    readonly taskName: string | null,
    readonly release: () => void = () => {},
  ) {}

  get numTokens(): number {
    return this.promptTokens.length + this.outputTokens.length;
  }

  get maxTotalTokens(): number {
    return this.prefixLength + this.promptTokens.length + this.params.maxTokens;
  }

  get isPrefilling(): boolean {
    return this.numComputedTokens < this.promptTokens.length;
  }

  tokenAt(index: number): number {
    return index < this.promptTokens.length
      ? this.promptTokens[index]!
      : this.outputTokens[index - this.promptTokens.length]!;
  }

  get usage() {
    return { promptTokens: this.promptTokens.length, completionTokens: this.outputTokens.length };
  }
}
