/**
 * @module engine/engine — Engine: submit(request) -> AsyncIterable<EngineEvent>, and the step loop
 * (schedule -> build step -> model.forward -> sample -> postprocess). The loop never throws out of itself:
 * a failed step ends the sequences it touched with an error event and keeps serving the rest.
 */
import { invalidRequest, TaskmuxError } from "../errors.ts";
import { createLogger } from "../log.ts";
import type { ModelBackend, StepResult } from "../model/contract.ts";
import type { ModelSpec } from "../model/model-spec.ts";
import type { TextTokenizer } from "../model/tokenizer.ts";
import { IncrementalDetokenizer } from "./detokenizer.ts";
import { type EngineEvent, EventChannel, type FinishReason } from "./events.ts";
import { KvCacheAccount } from "./kv-cache.ts";
import { createSamplerRng, isGreedy, logSoftmaxRow, sampleToken, topLogprobs } from "./sampler.ts";
import { type ScheduledStep, Scheduler, type SchedulerOptions } from "./scheduler.ts";
import { type GenerationParams, Sequence, type SequenceAdapters } from "./sequence.ts";
import { EngineStats } from "./stats.ts";
import { buildStep, type StepWork } from "./step-builder.ts";
import { StopStringMatcher } from "./stopping.ts";

const log = createLogger({ module: "engine" });

export interface EngineOptions extends SchedulerOptions {
  kvCacheBytes: number;
  /** Longest prompt accepted, in tokens; 0 or absent = the context window. */
  maxPromptTokens?: number;
}

export interface GenerateRequest {
  requestId: string;
  /** Token ids of the prompt; ids >= vocab address `adapters.virtualTable`. */
  promptTokens: number[];
  params: GenerationParams;
  adapters?: SequenceAdapters;
  taskName?: string | null;
  /** Called once the sequence is finished (release task refs, adapter pins). */
  onFinished?: () => void;
  /** Prefix-tuning keys/values to seed the cache with before the prompt. */
  prefix?: { length: number; keys: Float32Array[]; values: Float32Array[] };
}

export interface Submission {
  seqId: number;
  events: AsyncIterable<EngineEvent>;
}

/** One logits row of a step, as postprocessing reads it. */
interface LogitsRow {
  /** new-token index within the work item */
  token: number;
  /** null when the step did not fetch logits (no work read them: see StepWork.readsLogitValues) */
  values: Float32Array | null;
  greedyToken: number;
  finite: boolean;
}

function valuesOf(values: Float32Array | null): Float32Array {
  if (!values) throw new TaskmuxError("internal", "a step read logits it did not fetch");
  return values;
}

const IDENTITY_ADAPTERS: SequenceAdapters = { loraSlot: 0, ia3Slot: 0, bottleneckSlot: 0 };

export class Engine {
  readonly scheduler: Scheduler<Sequence>;
  readonly kv: KvCacheAccount;
  readonly stats = new EngineStats();
  private readonly sequences = new Map<number, Sequence>();
  private nextSeqId = 1;
  private wake: (() => void) | null = null;
  private loopRunning = false;
  private stopped = false;
  private admitting = true;
  private readonly eosIds: Set<number>;
  /** Longest prompt admitted (--max-prompt-tokens, or the context window). */
  readonly maxPromptTokens: number;
  /** seq id → the timer that ends it at its deadline, even while it waits or the loop sleeps */
  private readonly deadlineTimers = new Map<number, NodeJS.Timeout>();

  constructor(
    readonly spec: ModelSpec,
    readonly tokenizer: TextTokenizer,
    private readonly backend: ModelBackend,
    options: EngineOptions,
    eosIds: readonly number[],
  ) {
    const bytesPerToken = spec.numLayers * 2 * spec.numKvHeads * spec.headDim * 4;
    this.kv = new KvCacheAccount({ capacityBytes: options.kvCacheBytes, bytesPerToken });
    this.scheduler = new Scheduler<Sequence>(options, this.kv);
    this.eosIds = new Set(eosIds);
    this.maxPromptTokens = options.maxPromptTokens || spec.maxPositionEmbeddings;
  }

  get contextLength(): number {
    return this.spec.maxPositionEmbeddings;
  }

  get numRunningSequences(): number {
    return this.scheduler.numRunning;
  }

  get numWaitingSequences(): number {
    return this.scheduler.numWaiting;
  }

  /** Running and waiting sequences per task name (null = base); for metrics and drain. */
  tasksInFlight(): { running: Map<string | null, number>; waiting: Map<string | null, number> } {
    const running = new Map<string | null, number>();
    const waiting = new Map<string | null, number>();
    for (const s of this.sequences.values()) {
      const m = s.status === "running" ? running : waiting;
      m.set(s.taskName, (m.get(s.taskName) ?? 0) + 1);
    }
    return { running, waiting };
  }

  /** Queue a request; throws a TaskmuxError (never queues) for a request that cannot be served. */
  submit(request: GenerateRequest, signal?: AbortSignal): Submission {
    if (!this.admitting || this.stopped) {
      throw new TaskmuxError("shutting_down", "the server is shutting down and admits no new requests", {
        retryAfterSeconds: 5,
      });
    }
    this.validate(request);
    const id = this.nextSeqId++;
    const channel = new EventChannel();
    const seq = new Sequence(
      id,
      request.requestId,
      request.promptTokens,
      request.params,
      request.adapters ?? IDENTITY_ADAPTERS,
      createSamplerRng(request.params.seed),
      new IncrementalDetokenizer(
        this.tokenizer,
        request.promptTokens.filter((t) => t < this.spec.vocabSize),
      ),
      new StopStringMatcher(request.params.stop),
      channel,
      request.taskName ?? null,
      request.onFinished,
    );
    seq.prefixLength = request.prefix?.length ?? 0;
    this.scheduler.add(seq);
    this.sequences.set(id, seq);
    this.armDeadline(seq);
    this.stats.requestQueued();
    if (request.prefix) {
      // The worker handles messages in order, so the prefix is in place before this sequence's first step.
      this.backend
        .seedPrefix(id, request.prefix.length, request.prefix.keys, request.prefix.values)
        .catch((error) => {
          this.fail(
            seq,
            new TaskmuxError("internal", `could not place the task's prefix: ${(error as Error).message}`),
          );
        });
    }
    if (signal) {
      if (signal.aborted) this.cancel(seq);
      else signal.addEventListener("abort", () => this.cancel(seq), { once: true });
    }
    this.kick();
    return { seqId: id, events: channel };
  }

  private validate(request: GenerateRequest): void {
    const n = request.promptTokens.length;
    if (n === 0) throw invalidRequest("the prompt is empty: it must contain at least one token", "prompt");
    // Below the context window only: a longer prompt gets the message that names prompt and max_tokens.
    if (n > this.maxPromptTokens && this.maxPromptTokens < this.contextLength) {
      throw invalidRequest(
        `prompt (${n} tokens) exceeds the limit of ${this.maxPromptTokens} prompt tokens`,
        "prompt",
      );
    }
    const total = (request.prefix?.length ?? 0) + n + request.params.maxTokens;
    if (total > this.contextLength) {
      throw invalidRequest(
        `prompt (${n} tokens) + max_tokens (${request.params.maxTokens}) = ${total} exceeds the context window of ${this.contextLength} tokens`,
        "max_tokens",
      );
    }
    const rows = request.adapters?.virtualTable
      ? request.adapters.virtualTable.length / this.spec.hiddenSize
      : 0;
    for (const id of request.promptTokens) {
      if (!Number.isInteger(id) || id < 0 || id >= this.spec.vocabSize + rows) {
        throw invalidRequest(
          `prompt token id ${id} is outside the vocabulary (0..${this.spec.vocabSize - 1})`,
          "prompt",
        );
      }
    }
  }

  /** Cancel: a waiting sequence leaves at once; a running one at the next step boundary. */
  cancel(seq: Sequence): void {
    if (seq.status === "finished") return;
    seq.pendingFinish = "cancelled";
    if (!this.scheduler.isRunning(seq)) this.finish(seq, "cancelled");
    this.kick();
  }

  /**
   * The step loop checks deadlines only between steps, and sleeps when nothing is schedulable: a timer ends a
   * sequence at its deadline wherever it is (a waiting one at once, a running one at the next step boundary).
   */
  private armDeadline(seq: Sequence): void {
    const { deadlineMs } = seq.params;
    if (deadlineMs === null) return;
    const timer = setTimeout(() => {
      if (seq.status === "finished") return;
      seq.pendingFinish ??= "length";
      if (!this.scheduler.isRunning(seq)) this.finish(seq, seq.pendingFinish);
      this.kick();
    }, deadlineMs);
    timer.unref();
    this.deadlineTimers.set(seq.id, timer);
  }

  private kick(): void {
    this.wake?.();
    this.wake = null;
    if (!this.loopRunning && !this.stopped) {
      this.loopRunning = true;
      void this.loop();
    }
  }

  private async loop(): Promise<void> {
    try {
      while (!this.stopped) {
        if (await this.stepOnce()) continue;
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
      }
    } finally {
      this.loopRunning = false;
    }
  }

  /**
   * Schedules and runs one step; false when there is nothing to run. A frame of its own, so the loop's frame,
   * suspended while idle, holds no stale reference to the last step's sequences (and through them their task
   * version's weights) — V8 keeps a suspended async function's whole register file.
   */
  private async stepOnce(): Promise<boolean> {
    this.applyPendingFinishes();
    const step = this.scheduler.schedule();
    if (!step) return false;
    await this.runStep(step);
    return true;
  }

  private applyPendingFinishes(): void {
    const now = performance.now();
    for (const seq of this.sequences.values()) {
      if (seq.params.deadlineMs !== null && now - seq.arrivalMs > seq.params.deadlineMs)
        seq.pendingFinish ??= "length";
      if (seq.pendingFinish) this.finish(seq, seq.pendingFinish);
    }
  }

  private async runStep(step: ScheduledStep<Sequence>): Promise<void> {
    const works: StepWork[] = step.works.map(({ seq, numTokens }) => {
      seq.status = "running";
      const start = seq.numComputedTokens;
      const tokens = Array.from({ length: numTokens }, (_, i) => seq.tokenAt(start + i));
      const completes = start + numTokens === seq.numTokens;
      const scoring = seq.params.promptLogprobs !== null && start < seq.promptTokens.length;
      return {
        seqId: seq.id,
        tokens,
        pastLength: seq.prefixLength + start,
        logits: scoring ? "all" : completes ? "last" : "none",
        readsLogitValues: scoring || !isGreedy(seq.params) || seq.params.logprobs !== null,
        virtualTable: seq.adapters.virtualTable,
        loraSlot: seq.adapters.loraSlot,
        ia3Slot: seq.adapters.ia3Slot,
        bottleneckSlot: seq.adapters.bottleneckSlot,
      };
    });
    const built = buildStep(works, this.spec.vocabSize, this.spec.hiddenSize);
    const started = performance.now();
    let result: StepResult;
    try {
      result = await this.backend.forward(built.batch);
    } catch (error) {
      log.error("step failed", { kind: step.kind, rows: works.length, error });
      const failure = new TaskmuxError("internal", `model step failed: ${(error as Error).message}`, {
        cause: error,
      });
      for (const { seq } of step.works) this.fail(seq, failure);
      return;
    }
    this.stats.stepDone(step.kind, works.length, performance.now() - started);
    const V = this.spec.vocabSize;
    const { logits, greedyTokens, finiteRows } = result;
    const rowsByWork = new Map<number, LogitsRow[]>();
    built.owners.forEach((owner, r) => {
      const list = rowsByWork.get(owner.work) ?? [];
      list.push({
        token: owner.token,
        values: logits ? logits.subarray(r * V, (r + 1) * V) : null,
        greedyToken: greedyTokens[r]!,
        finite: finiteRows[r] === 1,
      });
      rowsByWork.set(owner.work, list);
    });
    step.works.forEach(({ seq, numTokens }, w) => {
      const start = seq.numComputedTokens;
      seq.numComputedTokens += numTokens;
      if (seq.status === "finished") return;
      try {
        this.postprocess(seq, start, numTokens, rowsByWork.get(w) ?? []);
      } catch (error) {
        this.fail(
          seq,
          error instanceof TaskmuxError ? error : new TaskmuxError("internal", (error as Error).message),
        );
      }
    });
  }

  private postprocess(seq: Sequence, start: number, numTokens: number, rows: LogitsRow[]) {
    if (!rows.every((r) => r.finite))
      throw new TaskmuxError("internal", "the model produced non-finite logits");
    const promptLength = seq.promptTokens.length;
    if (seq.params.promptLogprobs !== null && start < promptLength)
      this.collectPromptLogprobs(seq, start, rows);
    if (seq.numComputedTokens < seq.numTokens) return; // more prompt to prefill
    if (seq.outputTokens.length >= seq.params.maxTokens) {
      this.finish(seq, "length");
      return;
    }
    const last = rows.find((r) => r.token === numTokens - 1);
    if (!last) throw new TaskmuxError("internal", "no logits for the sampling row");
    this.emitToken(seq, last);
  }

  private readonly promptScores = new Map<
    number,
    { tokenId: number; logprob: number | null; topLogprobs: ReturnType<typeof topLogprobs> }[]
  >();

  private collectPromptLogprobs(seq: Sequence, start: number, rows: LogitsRow[]) {
    const entries = this.promptScores.get(seq.id) ?? [
      { tokenId: seq.promptTokens[0]!, logprob: null, topLogprobs: [] },
    ];
    for (const { token, values } of rows) {
      const next = start + token + 1; // logits at position i predict token i + 1
      if (next >= seq.promptTokens.length) continue;
      const lsm = logSoftmaxRow(valuesOf(values));
      const tokenId = seq.promptTokens[next]!;
      entries.push({
        tokenId,
        // Virtual (soft-prompt) tokens are not in the vocabulary: they have no logprob.
        logprob: tokenId < this.spec.vocabSize ? lsm[tokenId]! : null,
        topLogprobs: topLogprobs(lsm, seq.params.promptLogprobs ?? 0),
      });
    }
    if (seq.numComputedTokens >= seq.promptTokens.length) {
      this.promptScores.delete(seq.id);
      seq.channel.push({ type: "prompt_logprobs", entries });
    } else {
      this.promptScores.set(seq.id, entries);
    }
  }

  private emitToken(seq: Sequence, row: LogitsRow): void {
    const token = isGreedy(seq.params)
      ? row.greedyToken
      : sampleToken(valuesOf(row.values), seq.params, seq.rng);
    seq.outputTokens.push(token);
    const now = performance.now();
    this.stats.tokenGenerated(seq, now);
    seq.firstTokenMs ??= now;
    seq.lastTokenMs = now;
    const isEos = !seq.params.ignoreEos && (this.eosIds.has(token) || seq.params.extraEosIds.includes(token));
    let logprob: number | undefined;
    let top: ReturnType<typeof topLogprobs> | undefined;
    if (seq.params.logprobs !== null) {
      const lsm = logSoftmaxRow(valuesOf(row.values));
      logprob = lsm[token]!;
      top = topLogprobs(lsm, seq.params.logprobs);
    }
    if (isEos) {
      seq.channel.push({ type: "token", tokenId: token, text: "", logprob, topLogprobs: top });
      this.finish(seq, "stop");
      return;
    }
    const { emit, stopped } = seq.stopMatcher.push(seq.detokenizer.push(token));
    seq.channel.push({ type: "token", tokenId: token, text: emit, logprob, topLogprobs: top });
    if (stopped) this.finish(seq, "stop", { dropHeldText: true });
    else if (
      seq.outputTokens.length >= seq.params.maxTokens ||
      seq.prefixLength + seq.numTokens >= this.contextLength
    ) {
      this.finish(seq, "length");
    }
  }

  private finish(seq: Sequence, reason: FinishReason, options: { dropHeldText?: boolean } = {}): void {
    if (seq.status === "finished") return;
    const text = options.dropHeldText
      ? ""
      : seq.stopMatcher.push(seq.detokenizer.flush()).emit + seq.stopMatcher.flush();
    this.retire(seq);
    this.stats.requestFinished(seq, reason);
    seq.channel.push({ type: "finished", reason, text, usage: seq.usage });
  }

  private fail(seq: Sequence, error: TaskmuxError): void {
    if (seq.status === "finished") return;
    this.retire(seq);
    this.stats.requestFailed(seq, error.type);
    seq.channel.push({ type: "error", error, usage: seq.usage });
  }

  private retire(seq: Sequence): void {
    seq.status = "finished";
    this.scheduler.remove(seq);
    this.sequences.delete(seq.id);
    this.promptScores.delete(seq.id);
    clearTimeout(this.deadlineTimers.get(seq.id));
    this.deadlineTimers.delete(seq.id);
    this.backend.release([seq.id]);
    seq.release();
  }

  /** Stop admitting; resolves once every running and waiting sequence has finished (or the deadline passes). */
  async drain(deadlineMs: number): Promise<boolean> {
    const until = performance.now() + deadlineMs;
    while (this.sequences.size > 0 && performance.now() < until) await new Promise((r) => setTimeout(r, 20));
    return this.sequences.size === 0;
  }

  /** Refuse new work from now on (submit answers shutting_down); admitted sequences continue. */
  stopAdmitting(): void {
    this.admitting = false;
  }

  get isAdmitting(): boolean {
    return this.admitting;
  }

  async dispose(): Promise<void> {
    this.stopped = true;
    for (const seq of [...this.sequences.values()]) this.finish(seq, "cancelled");
    this.kick();
    await this.backend.dispose();
  }
}
