/**
 * @module engine/scheduler — iteration-level scheduling over ids and counts; never touches tensors.
 *
 * Each step is either a decode step (every running sequence that has a token to decode, one token each)
 * or a prefill step (prompt chunks of admitted sequences). When both kinds of work exist the scheduler
 * alternates, so running streams keep flowing while a long prompt is prefilled in chunks. Steps are not
 * mixed because the graph pads every row to the longest one: a 256-token chunk beside 31 decode rows would
 * cost 32 x 256 token-rows. Admission is FIFO (a long prompt at the head is never overtaken, so it cannot
 * starve), bounded by --max-num-seqs, the token budget and the KV reservation (see kv-cache.ts).
 */
import { TaskmuxError } from "../errors.ts";
import type { KvCacheAccount } from "./kv-cache.ts";

export interface SchedulableSequence {
  readonly id: number;
  /** Tokens known so far: prompt (incl. virtual tokens) + generated. */
  readonly numTokens: number;
  /** Tokens whose K/V are in the cache. */
  numComputedTokens: number;
  /** prompt + max_tokens: what the KV reservation covers. */
  readonly maxTotalTokens: number;
}

export interface SchedulerOptions {
  maxNumSeqs: number;
  /** Padded token-rows per step (rows x longest row). */
  maxBatchedTokens: number;
  /** Waiting-queue bound; a full queue answers 429. */
  maxWaiting: number;
}

export interface ScheduledWork<S> {
  seq: S;
  numTokens: number;
}

export interface ScheduledStep<S> {
  kind: "decode" | "prefill";
  works: ScheduledWork<S>[];
}

export class Scheduler<S extends SchedulableSequence> {
  private readonly waiting: S[] = [];
  private readonly running: S[] = [];
  private lastKind: "decode" | "prefill" = "prefill";

  constructor(
    private readonly options: SchedulerOptions,
    private readonly kv: KvCacheAccount,
  ) {}

  get numWaiting(): number {
    return this.waiting.length;
  }

  get numRunning(): number {
    return this.running.length;
  }

  get hasWork(): boolean {
    return this.waiting.length > 0 || this.running.some((s) => s.numComputedTokens < s.numTokens);
  }

  /** Queue a sequence; refuses (never queues) one that could never fit or when the queue is full. */
  add(seq: S): void {
    if (!this.kv.fitsAtAll(seq.maxTotalTokens)) {
      throw new TaskmuxError(
        "invalid_request",
        `prompt + max_tokens = ${seq.maxTotalTokens} tokens exceeds the KV cache capacity of ${this.kv.capacityTokens} tokens`,
        { param: "max_tokens" },
      );
    }
    if (this.waiting.length >= this.options.maxWaiting) {
      throw new TaskmuxError(
        "overloaded",
        `the waiting queue is full (${this.options.maxWaiting} requests); retry later`,
        {
          retryAfterSeconds: 1,
        },
      );
    }
    this.waiting.push(seq);
  }

  /** Drop a sequence wherever it is (finished, cancelled, failed) and release its KV reservation. */
  remove(seq: S): void {
    const w = this.waiting.indexOf(seq);
    if (w >= 0) this.waiting.splice(w, 1);
    const r = this.running.indexOf(seq);
    if (r >= 0) this.running.splice(r, 1);
    this.kv.release(seq.id);
  }

  isRunning(seq: S): boolean {
    return this.running.includes(seq);
  }

  schedule(): ScheduledStep<S> | null {
    const decodes = this.running.filter((s) => s.numTokens - s.numComputedTokens === 1);
    const prefillPending = this.running.some((s) => s.numTokens - s.numComputedTokens > 1) || this.canAdmit();
    const decodeTurn = decodes.length > 0 && (!prefillPending || this.lastKind === "prefill");
    if (decodeTurn) {
      this.lastKind = "decode";
      return {
        kind: "decode",
        works: decodes.slice(0, this.options.maxBatchedTokens).map((seq) => ({ seq, numTokens: 1 })),
      };
    }
    const works = this.schedulePrefill();
    if (works.length > 0) {
      this.lastKind = "prefill";
      return { kind: "prefill", works };
    }
    if (decodes.length > 0) {
      this.lastKind = "decode";
      return { kind: "decode", works: decodes.map((seq) => ({ seq, numTokens: 1 })) };
    }
    return null;
  }

  private canAdmit(): boolean {
    const head = this.waiting[0];
    return (
      head !== undefined &&
      this.running.length < this.options.maxNumSeqs &&
      this.kv.canReserve(head.maxTotalTokens)
    );
  }

  /** Continue partial prefills first (oldest first), then admit FIFO while budget, slots and KV allow. */
  private schedulePrefill(): ScheduledWork<S>[] {
    const budget = this.options.maxBatchedTokens;
    const rows: S[] = this.running.filter((s) => s.numTokens - s.numComputedTokens > 1);
    while (this.canAdmit()) {
      // Rows are padded to the longest chunk: admit only while the padded step still fits the budget.
      const candidate = this.waiting[0]!;
      const chunk = Math.min(
        budget,
        Math.max(...[...rows, candidate].map((s) => s.numTokens - s.numComputedTokens)),
      );
      if (rows.length > 0 && (rows.length + 1) * Math.min(chunk, budget) > budget) break;
      this.waiting.shift();
      this.kv.reserve(candidate.id, candidate.maxTotalTokens);
      this.running.push(candidate);
      rows.push(candidate);
    }
    if (rows.length === 0) return [];
    const longest = Math.max(...rows.map((s) => s.numTokens - s.numComputedTokens));
    const chunk = Math.max(1, Math.min(longest, Math.floor(budget / rows.length)));
    return rows.map((seq) => ({ seq, numTokens: Math.min(chunk, seq.numTokens - seq.numComputedTokens) }));
  }
}
