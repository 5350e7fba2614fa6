/**
 * @module engine/service — what the HTTP layer may ask of the engine: generate from text, tokens or chat
 * messages (optionally for a task), token strings for logprobs, and the numbers /metrics and /ready need.
 * HTTP depends on this interface only; tests give it a fake.
 */
import type { EngineEvent } from "./events.ts";
import type { GenerationParams } from "./sequence.ts";

export interface ChatMessage {
  role: string;
  content: string;
}

export type PromptInput =
  | { kind: "text"; text: string }
  | { kind: "tokens"; tokens: number[] }
  | { kind: "chat"; messages: ChatMessage[] };

export interface GenerationInput {
  requestId: string;
  prompt: PromptInput;
  /** Task name (already validated as a name); null = the plain base model. */
  task: string | null;
  /** Values the request set; the service fills the rest from the task's and the model's defaults. */
  params: Partial<GenerationParams>;
  /** Template fields for tasks whose prompt_template names {field} slots. */
  fields?: Record<string, string>;
}

export interface GenerationHandle {
  seqId: number;
  /** The prompt as the model sees it (virtual tokens are ids >= vocab). */
  promptTokens: number[];
  events: AsyncIterable<EngineEvent>;
}

export interface TaskSummary {
  name: string;
  /** e.g. ["prompt_template", "prompt_tuning", "lora"] */
  kinds: string[];
  /** Unix seconds. */
  createdAt: number;
  version: number;
}

export interface ServingStats {
  numRunning: number;
  numWaiting: number;
  kvCacheUsage: number;
  kvCacheCapacityTokens: number;
  lastBatchSize: number;
  /** Adapters resident in pools (names), and the pool size. */
  residentAdapters: string[];
  maxResidentAdapters: number;
  runningByTask: Map<string | null, number>;
  waitingByTask: Map<string | null, number>;
}

export interface GenerationService {
  /** The base model's id as /v1/models lists it. */
  readonly modelId: string;
  readonly contextLength: number;
  /** Resolves the task (loading it on demand), renders the prompt, queues the sequence. Throws TaskmuxError. */
  generate(input: GenerationInput, signal?: AbortSignal): Promise<GenerationHandle>;
  /** A token's own text as OpenAI/vLLM report it in logprobs (` the`, not `Ġthe`); bytes of a split
   * character show as U+FFFD; virtual tokens show as `<|virtual_n|>`. */
  tokenText(tokenId: number): string;
  /** The exact bytes a token contributes to the output (chat logprobs `bytes`); [] for special/virtual. */
  tokenBytes(tokenId: number): number[];
  /** Text of tokens as it appears in the output: special and virtual tokens are skipped. */
  decode(tokenIds: number[]): string;
  /** True for loaded tasks and for tasks a request would load on demand from the task roots. */
  hasTask(name: string): boolean;
  listTasks(): TaskSummary[];
  /** Readiness: model loaded and admitting. */
  readonly isReady: boolean;
  stats(): ServingStats;
  /** Engine-level histograms and counters, rendered by /metrics. */
  readonly engineStats: import("./stats.ts").EngineStats;
}
