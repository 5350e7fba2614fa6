/**
 * @module test/helpers/fake-service — a deterministic GenerationService for HTTP tests. It "generates" a fixed
 * script of words starting at `seed % script length`, honours maxTokens / stop / ignoreEos / logprobs / prompt
 * logprobs, can fail at start or mid-stream, and records every call with the AbortSignal it got.
 */
import type { EngineEvent, FinishReason, TokenEvent, Usage } from "../../src/engine/events.ts";
import type { TokenLogprob } from "../../src/engine/sampler.ts";
import type {
  GenerationHandle,
  GenerationInput,
  GenerationService,
  ServingStats,
  TaskSummary,
} from "../../src/engine/service.ts";
import { EngineStats } from "../../src/engine/stats.ts";
import { TaskmuxError } from "../../src/errors.ts";

/** id → text. Ids >= CHAR_BASE are single characters (code point = id - CHAR_BASE). */
export const VOCAB = [
  "<eos>",
  " the",
  " cat",
  " sat",
  " on",
  " mat",
  ".",
  " dog",
  "Hello",
  " world",
  "é",
] as const;
export const EOS_ID = 0;
export const CHAR_BASE = 1000;
/** The words generated, in order, wrapping around; seed s starts at index s % length. */
export const SCRIPT_IDS = [1, 2, 3, 4, 1, 5, 6];
export const FAKE_MODEL_ID = "fake/base-model";
/** Service default when a request sets no maxTokens. */
export const FAKE_DEFAULT_MAX_TOKENS = 32;

export interface FakeCall {
  input: GenerationInput;
  signal: AbortSignal | undefined;
  promptTokens: number[];
}

export interface FakeServiceOptions {
  tasks?: string[];
  /** Milliseconds between tokens (0 = as fast as the event loop allows). */
  tokenDelayMs?: number;
  /** Emit EOS after this many tokens (unless ignoreEos). */
  eosAfter?: number;
  /** Throw from generate(): return an error for the call (by 0-based call index) to fail it. */
  failStart?: (input: GenerationInput, call: number) => TaskmuxError | undefined;
  /** Emit an error event after `afterTokens` tokens on calls `failMidStream.calls` (all when absent). */
  failMidStream?: { afterTokens: number; error: TaskmuxError; calls?: number[] };
  ready?: boolean;
}

/** Text prompt → ids: greedy longest vocabulary match, else one id per character. */
export function encode(text: string): number[] {
  const ids: number[] = [];
  let i = 0;
  while (i < text.length) {
    let best = -1;
    VOCAB.forEach((word, id) => {
      if (id !== EOS_ID && text.startsWith(word, i) && (best < 0 || word.length > VOCAB[best]!.length))
        best = id;
    });
    if (best >= 0) {
      ids.push(best);
      i += VOCAB[best]!.length;
    } else {
      const cp = text.codePointAt(i)!;
      ids.push(CHAR_BASE + cp);
      i += String.fromCodePoint(cp).length;
    }
  }
  return ids;
}

export function decodeIds(ids: readonly number[]): string {
  return ids
    .map((id) => (id === EOS_ID ? "" : id >= CHAR_BASE ? String.fromCodePoint(id - CHAR_BASE) : VOCAB[id]!))
    .join("");
}

/** The raw vocabulary spelling (byte-level BPE style: a leading space is "Ġ"). */
export function rawTokenText(id: number): string {
  return id >= CHAR_BASE ? String.fromCodePoint(id - CHAR_BASE) : VOCAB[id]!.replace(/^ /, "Ġ");
}

/** The id generated at step j for a seed (no seed = 0). */
export function scriptToken(seed: number | null | undefined, j: number): number {
  const start = (((seed ?? 0) % SCRIPT_IDS.length) + SCRIPT_IDS.length) % SCRIPT_IDS.length;
  return SCRIPT_IDS[(start + j) % SCRIPT_IDS.length]!;
}

/** Logprob the fake reports for generated token j / prompt token i. */
export const tokenLogprob = (j: number): number => -0.25 * (j + 1);
export const promptTokenLogprob = (i: number): number => -0.5 * i;

function topFor(token: number, logprob: number, n: number): TokenLogprob[] {
  const others = [7, 8, 9, 10].filter((id) => id !== token);
  return [{ token, logprob }, ...others.map((id, k) => ({ token: id, logprob: logprob - 1 - k }))].slice(
    0,
    n,
  );
}

/** Sleeps ms, or less if the signal aborts first. */
const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });

export class FakeService implements GenerationService {
  readonly modelId = FAKE_MODEL_ID;
  readonly contextLength = 512;
  readonly engineStats = new EngineStats();
  readonly calls: FakeCall[] = [];
  /** Every name hasTask() was asked about (a malformed name must never show up here). */
  readonly hasTaskCalls: string[] = [];
  isReady: boolean;
  tasks: Map<string, TaskSummary>;
  /** Overrides merged into stats(). */
  statsOverride: Partial<ServingStats> = {};
  private readonly active = new Map<number, string | null>();
  private nextSeqId = 1;

  constructor(readonly options: FakeServiceOptions = {}) {
    this.isReady = options.ready ?? true;
    this.tasks = new Map(
      (options.tasks ?? []).map((name, i) => [
        name,
        { name, kinds: ["prompt_template", "lora"], createdAt: 1_700_000_000_000 + i, version: 1 },
      ]),
    );
  }

  async generate(input: GenerationInput, signal?: AbortSignal): Promise<GenerationHandle> {
    const promptTokens = this.promptTokensOf(input);
    const call = this.calls.length;
    this.calls.push({ input, signal, promptTokens });
    const failure = this.options.failStart?.(input, call);
    if (failure) throw failure;
    if (input.task !== null && !this.tasks.has(input.task)) {
      throw new TaskmuxError("task_not_found", `task '${input.task}' does not exist`);
    }
    const seqId = this.nextSeqId++;
    return { seqId, promptTokens, events: this.run(seqId, call, input, promptTokens, signal) };
  }

  private promptTokensOf(input: GenerationInput): number[] {
    const { prompt } = input;
    if (prompt.kind === "tokens") return [...prompt.tokens];
    if (prompt.kind === "text") return encode(prompt.text);
    return encode(prompt.messages.map((m) => `<${m.role}>${m.content}\n`).join("") + "<assistant>");
  }

  private async *run(
    seqId: number,
    call: number,
    input: GenerationInput,
    promptTokens: number[],
    signal: AbortSignal | undefined,
  ): AsyncGenerator<EngineEvent> {
    const p = input.params;
    const maxTokens = p.maxTokens ?? FAKE_DEFAULT_MAX_TOKENS;
    const stops = p.stop ?? [];
    const usage = (completionTokens: number) => ({ promptTokens: promptTokens.length, completionTokens });
    this.active.set(seqId, input.task);
    let count = 0;
    let text = "";
    try {
      if (p.promptLogprobs != null) {
        const entries = promptTokens.map((tokenId, i) => ({
          tokenId,
          logprob: i === 0 ? null : promptTokenLogprob(i),
          topLogprobs: i === 0 ? [] : topFor(tokenId, promptTokenLogprob(i), p.promptLogprobs!),
        }));
        yield { type: "prompt_logprobs", entries };
      }
      const fail = this.options.failMidStream;
      for (; count < maxTokens; ) {
        if (this.options.tokenDelayMs) await sleep(this.options.tokenDelayMs, signal);
        if (signal?.aborted) break;
        if (fail && count === fail.afterTokens && (!fail.calls || fail.calls.includes(call))) {
          yield { type: "error", error: fail.error, usage: usage(count) };
          return;
        }
        const isEos = this.options.eosAfter === count && !p.ignoreEos;
        const tokenId = isEos ? EOS_ID : scriptToken(p.seed, count);
        count++;
        const event: TokenEvent = { type: "token", tokenId, text: "" };
        if (p.logprobs != null) {
          event.logprob = tokenLogprob(count - 1);
          event.topLogprobs = topFor(tokenId, event.logprob, p.logprobs);
        }
        if (isEos) {
          yield event;
          yield this.finish(input, "stop", usage(count));
          return;
        }
        const candidate = text + decodeIds([tokenId]);
        const stopAt = Math.min(...stops.map((s) => candidate.indexOf(s)).filter((k) => k >= 0));
        event.text = candidate.slice(
          text.length,
          Number.isFinite(stopAt) ? Math.max(stopAt, text.length) : undefined,
        );
        text += event.text;
        yield event;
        if (Number.isFinite(stopAt)) {
          yield this.finish(input, "stop", usage(count));
          return;
        }
      }
      yield this.finish(input, signal?.aborted ? "cancelled" : "length", usage(count));
    } finally {
      this.active.delete(seqId);
    }
  }

  private finish(input: GenerationInput, reason: FinishReason, u: Usage): EngineEvent {
    const key = input.task ?? "";
    const stats = this.engineStats;
    stats.promptTokens.set(key, (stats.promptTokens.get(key) ?? 0) + u.promptTokens);
    stats.generatedTokens.set(key, (stats.generatedTokens.get(key) ?? 0) + u.completionTokens);
    stats.finished.set(reason, (stats.finished.get(reason) ?? 0) + 1);
    return { type: "finished", reason, text: "", usage: u };
  }

  tokenText(tokenId: number): string {
    return rawTokenText(tokenId);
  }

  tokenBytes(tokenId: number): number[] {
    return Array.from(Buffer.from(decodeIds([tokenId]), "utf8"));
  }

  decode(tokenIds: number[]): string {
    return decodeIds(tokenIds);
  }

  hasTask(name: string): boolean {
    this.hasTaskCalls.push(name);
    return this.tasks.has(name);
  }

  listTasks(): TaskSummary[] {
    return [...this.tasks.values()];
  }

  stats(): ServingStats {
    const runningByTask = new Map<string | null, number>();
    for (const task of this.active.values()) runningByTask.set(task, (runningByTask.get(task) ?? 0) + 1);
    return {
      numRunning: this.active.size,
      numWaiting: 0,
      kvCacheUsage: 0.25,
      kvCacheCapacityTokens: 4096,
      lastBatchSize: this.active.size,
      residentAdapters: [],
      maxResidentAdapters: 4,
      runningByTask,
      waitingByTask: new Map(),
      ...this.statsOverride,
    };
  }

  /** Resolves once call `index` has been made (or rejects after timeoutMs). */
  async waitForCall(index: number, timeoutMs = 2000): Promise<FakeCall> {
    const until = Date.now() + timeoutMs;
    while (this.calls.length <= index) {
      if (Date.now() > until) throw new Error(`timed out waiting for generate call #${index}`);
      await sleep(5);
    }
    return this.calls[index]!;
  }

  /** Resolves once call `index`'s AbortSignal has fired (or rejects after timeoutMs). */
  async waitForAbort(index: number, timeoutMs = 2000): Promise<void> {
    const { signal } = await this.waitForCall(index, timeoutMs);
    if (!signal) throw new Error(`generate call #${index} got no AbortSignal`);
    if (signal.aborted) return;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`call #${index}'s signal did not abort in ${timeoutMs} ms`)),
        timeoutMs,
      );
      const onAbort = () => {
        clearTimeout(timer);
        resolve();
      };
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }
}
