/** @module engine/stats — counters and histograms the engine updates; /metrics renders them (http/ops.ts). */
import type { FinishReason } from "./events.ts";
import type { Sequence } from "./sequence.ts";

/** Cumulative histogram with fixed upper bounds (Prometheus style). */
export class Histogram {
  readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(readonly bounds: readonly number[]) {
    this.counts = new Array(bounds.length).fill(0);
  }

  observe(value: number): void {
    this.sum += value;
    this.count++;
    for (let i = 0; i < this.bounds.length; i++) if (value <= this.bounds[i]!) this.counts[i]!++;
  }
}

const LATENCY_BOUNDS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];
const BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128, 256];

type TaskKey = string;
const keyOf = (task: string | null): TaskKey => task ?? "";

export class EngineStats {
  readonly timeToFirstToken = new Histogram(LATENCY_BOUNDS_S);
  readonly interTokenLatency = new Histogram(LATENCY_BOUNDS_S);
  /** Model time of one step (forward only), by step kind: decode steps are what streams wait on. */
  readonly stepSeconds = {
    decode: new Histogram(LATENCY_BOUNDS_S),
    prefill: new Histogram(LATENCY_BOUNDS_S),
  };
  readonly batchSize = new Histogram(BATCH_BOUNDS);
  readonly promptTokens = new Map<TaskKey, number>();
  readonly generatedTokens = new Map<TaskKey, number>();
  readonly finished = new Map<string, number>();
  readonly failures = new Map<string, number>();
  numSteps = 0;
  numQueued = 0;
  lastBatchSize = 0;

  requestQueued(): void {
    this.numQueued++;
  }

  stepDone(kind: "decode" | "prefill", rows: number, ms: number): void {
    this.numSteps++;
    this.lastBatchSize = rows;
    this.batchSize.observe(rows);
    this.stepSeconds[kind].observe(ms / 1000);
  }

  tokenGenerated(seq: Sequence, nowMs: number): void {
    const key = keyOf(seq.taskName);
    this.generatedTokens.set(key, (this.generatedTokens.get(key) ?? 0) + 1);
    if (seq.lastTokenMs === null) this.timeToFirstToken.observe((nowMs - seq.arrivalMs) / 1000);
    else this.interTokenLatency.observe((nowMs - seq.lastTokenMs) / 1000);
  }

  requestFinished(seq: Sequence, reason: FinishReason): void {
    this.countPrompt(seq);
    this.finished.set(reason, (this.finished.get(reason) ?? 0) + 1);
  }

  requestFailed(seq: Sequence, type: string): void {
    this.countPrompt(seq);
    this.failures.set(type, (this.failures.get(type) ?? 0) + 1);
  }

  private countPrompt(seq: Sequence): void {
    const key = keyOf(seq.taskName);
    this.promptTokens.set(key, (this.promptTokens.get(key) ?? 0) + seq.promptTokens.length);
  }
}
