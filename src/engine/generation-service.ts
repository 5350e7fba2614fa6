/**
 * @module engine/generation-service — the GenerationService the HTTP layer talks to: renders prompts
 * (text, tokens, chat), resolves tasks, fills defaults (request > task > generation_config > OpenAI's),
 * and submits to the Engine.
 */
import { randomUUID } from "node:crypto";
import { TaskmuxError } from "../errors.ts";
import type { GenerationDefaults } from "../model/checkpoint.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import type { Engine, GenerateRequest } from "./engine.ts";
import type { GenerationParams, SequenceAdapters } from "./sequence.ts";
import type {
  GenerationHandle,
  GenerationInput,
  GenerationService,
  PromptInput,
  ServingStats,
  TaskSummary,
} from "./service.ts";
import type { EngineStats } from "./stats.ts";

/** What a task contributes to one request (built by the task layer; the base model has none). */
export interface PreparedTask {
  /** Final prompt ids (template rendered, virtual tokens placed as ids >= vocab). */
  promptTokens: number[];
  adapters: SequenceAdapters;
  defaults: Partial<GenerationParams>;
  prefix?: GenerateRequest["prefix"];
  /** Release the task version and adapter pins once the sequence ends. */
  release: () => void;
}

/** The seam to the task registry (prompt tables, adapters); see engine/tasks.ts. */
export interface TaskProvider {
  /** Loaded, or loadable on demand from the task roots. */
  has(name: string): boolean;
  list(): TaskSummary[];
  /**
   * Render the prompt for `name`; throws task_not_found / invalid_request. `promptBudget` is the most
   * prompt tokens the request leaves room for (a task's truncate_field is cut to fit it).
   */
  prepare(
    name: string,
    prompt: PromptInput,
    fields: Record<string, string>,
    promptBudget: number,
  ): Promise<PreparedTask>;
  residentAdapters(): string[];
  readonly maxResidentAdapters: number;
}

export interface GenerationServiceOptions {
  modelId: string;
  generation: GenerationDefaults;
  requestTimeoutMs: number;
}

export class EngineGenerationService implements GenerationService {
  readonly modelId: string;

  constructor(
    private readonly engine: Engine,
    private readonly tokenizer: TextTokenizer,
    private readonly tasks: TaskProvider | null,
    private readonly options: GenerationServiceOptions,
  ) {
    this.modelId = options.modelId;
  }

  get contextLength(): number {
    return this.engine.contextLength;
  }

  get isReady(): boolean {
    return this.engine.isAdmitting;
  }

  get engineStats(): EngineStats {
    return this.engine.stats;
  }

  /** Base-model prompt rendering: text is encoded as HF `tokenizer(text)` does; chat via the chat template. */
  renderPrompt(prompt: PromptInput): number[] {
    switch (prompt.kind) {
      case "tokens":
        return [...prompt.tokens];
      case "text":
        return this.tokenizer.encode(prompt.text);
      case "chat":
        // The template places BOS itself when the model wants it (HF apply_chat_template(tokenize=True)).
        return this.tokenizer.encode(this.tokenizer.applyChatTemplate(prompt.messages), {
          addSpecialTokens: false,
        });
    }
  }

  async generate(input: GenerationInput, signal?: AbortSignal): Promise<GenerationHandle> {
    let task: PreparedTask | null = null;
    if (input.task !== null) {
      if (!this.tasks)
        throw new TaskmuxError("task_not_found", `task ${JSON.stringify(input.task)} does not exist`, {
          param: "X-Task",
        });
      const room = this.contextLength - Math.max(1, input.params.maxTokens ?? 1);
      task = await this.tasks.prepare(
        input.task,
        input.prompt,
        input.fields ?? {},
        Math.min(room, this.engine.maxPromptTokens),
      );
    }
    try {
      const promptTokens = task ? task.promptTokens : this.renderPrompt(input.prompt);
      const params = this.resolveParams(input.params, task?.defaults ?? {}, promptTokens.length);
      const submission = this.engine.submit(
        {
          requestId: input.requestId || randomUUID(),
          promptTokens,
          params,
          adapters: task?.adapters,
          taskName: input.task,
          onFinished: task?.release,
          prefix: task?.prefix,
        },
        signal,
      );
      return { seqId: submission.seqId, promptTokens, events: submission.events };
    } catch (error) {
      task?.release();
      throw error;
    }
  }

  private resolveParams(
    request: Partial<GenerationParams>,
    task: Partial<GenerationParams>,
    promptLength: number,
  ): GenerationParams {
    const g = this.options.generation;
    return {
      temperature: request.temperature ?? task.temperature ?? g.temperature ?? 1,
      topP: request.topP ?? task.topP ?? g.topP ?? 1,
      topK: request.topK ?? task.topK ?? g.topK ?? 0,
      seed: request.seed ?? task.seed ?? null,
      maxTokens: request.maxTokens ?? task.maxTokens ?? Math.max(0, this.contextLength - promptLength),
      stop: request.stop ?? task.stop ?? [],
      ignoreEos: request.ignoreEos ?? false,
      logprobs: request.logprobs ?? null,
      promptLogprobs: request.promptLogprobs ?? null,
      deadlineMs: request.deadlineMs ?? this.options.requestTimeoutMs,
      extraEosIds: request.extraEosIds ?? task.extraEosIds ?? [],
    };
  }

  tokenText(tokenId: number): string {
    if (tokenId >= this.engine.spec.vocabSize) return `<|virtual_${tokenId - this.engine.spec.vocabSize}|>`;
    const bytes = this.tokenizer.tokenBytes(tokenId);
    return bytes ? this.utf8.decode(bytes) : this.tokenizer.tokenString(tokenId);
  }

  tokenBytes(tokenId: number): number[] {
    if (tokenId >= this.engine.spec.vocabSize) return [];
    return Array.from(this.tokenizer.tokenBytes(tokenId) ?? []);
  }

  decode(tokenIds: number[]): string {
    return this.tokenizer.decode(
      tokenIds.filter((id) => id < this.engine.spec.vocabSize),
      { skipSpecialTokens: true },
    );
  }

  private readonly utf8 = new TextDecoder("utf-8");

  hasTask(name: string): boolean {
    return this.tasks?.has(name) ?? false;
  }

  listTasks(): TaskSummary[] {
    return this.tasks?.list() ?? [];
  }

  stats(): ServingStats {
    const inFlight = this.engine.tasksInFlight();
    return {
      numRunning: this.engine.numRunningSequences,
      numWaiting: this.engine.numWaitingSequences,
      kvCacheUsage: this.engine.kv.usageFraction,
      kvCacheCapacityTokens: this.engine.kv.capacityTokens,
      lastBatchSize: this.engine.stats.lastBatchSize,
      residentAdapters: this.tasks?.residentAdapters() ?? [],
      maxResidentAdapters: this.tasks?.maxResidentAdapters ?? 0,
      runningByTask: inFlight.running,
      waitingByTask: inFlight.waiting,
    };
  }
}
