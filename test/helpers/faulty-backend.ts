/**
 * @module test/helpers/faulty-backend — a ModelBackend proxy that injects faults into a real backend: a forward
 * that throws (as an onnxruntime failure would), NaN logits in chosen sequences' rows, or a slow step; plus an
 * Engine + GenerationService built around it the way test/helpers/tiny-model.ts builds the stack's own.
 */
import { Engine, type EngineOptions } from "../../src/engine/engine.ts";
import { EngineGenerationService } from "../../src/engine/generation-service.ts";
import type {
  AdapterPoolKind,
  ModelBackend,
  SequenceAdapterWeights,
  StepBatch,
  StepResult,
} from "../../src/model/contract.ts";
import type { LoadedModel } from "../../src/model/load-model.ts";

export interface Faults {
  /** Throw from forward (before the real forward runs) when this returns true. */
  throwWhen?: (batch: StepBatch, forwardIndex: number) => boolean;
  /** Overwrite these sequences' logit rows with NaN (after the real forward). */
  poisonSeqIds?: Set<number>;
  /** Delay every forward by this many milliseconds. */
  delayMs?: number;
}

export const INJECTED_FAILURE =
  "injected onnxruntime failure: Non-zero status code returned while running MatMul node";

export class FaultyBackend implements ModelBackend {
  faults: Faults = {};
  numForwards = 0;
  /** Sequence ids of the rows of the most recent forward. */
  lastSeqIds: number[] = [];
  /** Every id passed to release(), in order. */
  readonly released: number[] = [];

  constructor(private readonly inner: ModelBackend) {}

  async forward(batch: StepBatch): Promise<StepResult> {
    const index = this.numForwards++;
    this.lastSeqIds = batch.rows.map((r) => r.seqId);
    if (this.faults.delayMs) await new Promise((r) => setTimeout(r, this.faults.delayMs));
    if (this.faults.throwWhen?.(batch, index)) throw new Error(INJECTED_FAILURE);
    const result = await this.inner.forward(batch);
    const poisoned = this.faults.poisonSeqIds;
    if (poisoned && poisoned.size > 0) {
      for (let r = 0; r < result.numLogitRows; r++) {
        const row = Math.floor(Number(batch.logitsIndex[r]) / batch.seqLen);
        if (!poisoned.has(batch.rows[row]!.seqId)) continue;
        // What a NaN-producing model looks like from outside: the row's sum is NaN, its values NaN.
        result.finiteRows[r] = 0;
        if (result.logits) {
          const vocab = result.logits.length / result.numLogitRows;
          result.logits.fill(Number.NaN, r * vocab, (r + 1) * vocab);
        }
      }
    }
    return result;
  }

  release(seqIds: readonly number[]): void {
    this.released.push(...seqIds);
    this.inner.release(seqIds);
  }

  seedPrefix(seqId: number, length: number, keys: Float32Array[], values: Float32Array[]): Promise<void> {
    return this.inner.seedPrefix(seqId, length, keys, values);
  }

  writeAdapterSlot(kind: AdapterPoolKind, slot: number, weights: SequenceAdapterWeights): Promise<void> {
    return this.inner.writeAdapterSlot(kind, slot, weights);
  }

  clearAdapterSlot(kind: AdapterPoolKind, slot: number): Promise<void> {
    return this.inner.clearAdapterSlot(kind, slot);
  }

  dispose(): Promise<void> {
    return this.inner.dispose();
  }
}

export interface FaultyStack {
  backend: FaultyBackend;
  engine: Engine;
  service: EngineGenerationService;
}

/** An Engine and service (base model, no tasks) over a FaultyBackend wrapping `model.backend`. */
export function faultyStack(
  model: LoadedModel,
  options: Partial<EngineOptions> & { requestTimeoutMs?: number } = {},
): FaultyStack {
  const backend = new FaultyBackend(model.backend);
  const engine = new Engine(
    model.info.spec,
    model.tokenizer,
    backend,
    {
      maxNumSeqs: options.maxNumSeqs ?? 32,
      maxBatchedTokens: options.maxBatchedTokens ?? 256,
      maxWaiting: options.maxWaiting ?? 256,
      kvCacheBytes: options.kvCacheBytes ?? 64 * 2 ** 20,
      maxPromptTokens: options.maxPromptTokens,
    },
    model.tokenizer.eosIds,
  );
  const service = new EngineGenerationService(engine, model.tokenizer, null, {
    modelId: "tiny",
    generation: model.info.generation,
    requestTimeoutMs: options.requestTimeoutMs ?? 60_000,
  });
  return { backend, engine, service };
}
