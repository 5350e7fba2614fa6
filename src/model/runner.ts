/**
 * @module model/runner — ModelRunner.forward(StepBatch) -> logits: owns the session, the KV store and the
 * PEFT pools. Runs wherever it is constructed (the model worker in production, in-process in tests).
 */
import {
  type AdapterPoolKind,
  INPUT,
  type ModelBackend,
  OUTPUT,
  type PeftLayout,
  type SequenceAdapterWeights,
  type StepBatch,
  type StepResult,
} from "./contract.ts";
import { KvStore } from "./kv-store.ts";
import type { ModelSpec } from "./model-spec.ts";
import { PeftPools, type PoolCapacity, type PoolKind } from "./peft-pools.ts";
import { type FeedValue, ModelSession, type SessionOptions } from "./session.ts";

export interface RunnerOptions extends SessionOptions {
  modelPath: string;
  spec: ModelSpec;
  peft: PeftLayout;
  pools: PoolCapacity;
}

/** The logits of a step that fetched them (every step built with the default readsLogitValues does). */
export function logitsOf(result: StepResult): Float32Array {
  if (!result.logits) throw new Error("the step did not fetch logits (StepBatch.fetchLogits was false)");
  return result.logits;
}

export class ModelRunner implements ModelBackend {
  readonly kv: KvStore;
  readonly pools: PeftPools;
  /** greedy_token and logits_row_sum (logits are added when fetched). */
  private readonly rowOutputs = [OUTPUT.greedyToken, OUTPUT.logitsRowSum];

  private constructor(
    private readonly session: ModelSession,
    private readonly spec: ModelSpec,
    peft: PeftLayout,
    pools: PoolCapacity,
  ) {
    this.kv = new KvStore({ numLayers: spec.numLayers, numKvHeads: spec.numKvHeads, headDim: spec.headDim });
    this.pools = new PeftPools(spec, peft, pools);
  }

  static async create(options: RunnerOptions): Promise<ModelRunner> {
    const session = await ModelSession.create(options.modelPath, options);
    return new ModelRunner(session, options.spec, options.peft, options.pools);
  }

  async forward(step: StepBatch): Promise<StepResult> {
    const { spec } = this;
    const { batch, past, pastFed, mask } = this.pastFor(step);
    const B = batch.rows.length;
    const T = batch.seqLen;
    const seqIds = batch.rows.map((r) => r.seqId);
    const kvDims = [B, spec.numKvHeads, 1, pastFed, spec.headDim];
    const used = (slots: BigInt64Array) => slots.some((s) => s !== 0n);
    const usage: Record<PoolKind, boolean> = {
      lora: used(batch.loraSlots),
      ia3: used(batch.ia3Slots),
      bottleneck: used(batch.bottleneckSlots),
    };
    const feeds: Record<string, FeedValue> = {
      ...this.pools.feeds(usage, batch.loraSlots, batch.ia3Slots),
      [INPUT.inputIds]: { type: "int64", data: batch.inputIds, dims: [B, T] },
      [INPUT.positionIds]: { type: "int64", data: batch.positionIds, dims: [B, T] },
      [INPUT.attentionMask]: { type: "bool", data: mask, dims: [B, 1, T, pastFed + T] },
      [INPUT.logitsIndex]: { type: "int64", data: batch.logitsIndex, dims: [batch.logitsIndex.length] },
      [INPUT.virtualEmbeddings]: {
        type: "float32",
        data: batch.virtualEmbeddings,
        dims: [batch.virtualEmbeddings.length / spec.hiddenSize, spec.hiddenSize],
      },
      [INPUT.loraSlot]: {
        type: "int64",
        data: usage.lora ? batch.loraSlots : new BigInt64Array(B),
        dims: [B],
      },
      [INPUT.ia3Slot]: { type: "int64", data: usage.ia3 ? batch.ia3Slots : new BigInt64Array(B), dims: [B] },
      [INPUT.bottleneckSlot]: {
        type: "int64",
        data: usage.bottleneck ? batch.bottleneckSlots : new BigInt64Array(B),
        dims: [B],
      },
    };
    for (let l = 0; l < spec.numLayers; l++) {
      feeds[INPUT.pastKey(l)] = { type: "float32", data: past.keys[l]!, dims: kvDims };
      feeds[INPUT.pastValue(l)] = { type: "float32", data: past.values[l]!, dims: kvDims };
    }
    // A step with no logits rows (a prompt chunk that is not the last) fetches no per-row outputs at all:
    // onnxruntime warns when a reduction over an empty [0, V] comes back shaped [0, V].
    const R = batch.logitsIndex.length;
    const perRow = R === 0 ? [] : batch.fetchLogits ? [OUTPUT.logits, ...this.rowOutputs] : this.rowOutputs;
    const fetched = [...perRow, OUTPUT.newKv];
    const out = await this.session.run(feeds, fetched, this.pools.defaults);
    const newKv = out.float32(OUTPUT.newKv);
    const block = B * T * spec.numKvHeads * spec.headDim; // one layer's keys (or values)
    const newKeys: Float32Array[] = [];
    const newValues: Float32Array[] = [];
    for (let l = 0; l < spec.numLayers; l++) {
      newKeys.push(newKv.subarray(2 * l * block, (2 * l + 1) * block));
      newValues.push(newKv.subarray((2 * l + 1) * block, (2 * l + 2) * block));
    }
    this.kv.append(
      seqIds,
      batch.rows.map((r) => r.numNewTokens),
      T,
      newKeys,
      newValues,
    );
    const greedy = R === 0 ? new BigInt64Array(0) : out.int64(OUTPUT.greedyToken);
    const sums = R === 0 ? new Float32Array(0) : out.float32(OUTPUT.logitsRowSum);
    return {
      logits: batch.fetchLogits ? (R === 0 ? new Float32Array(0) : out.float32(OUTPUT.logits)) : null,
      numLogitRows: R,
      greedyTokens: Int32Array.from(greedy, Number),
      // A row sum is finite only if every logit is (barring an overflow of the sum itself, > 3e38).
      finiteRows: Uint8Array.from(sums, (s) => (Number.isFinite(s) ? 1 : 0)),
    };
  }

  /**
   * Decode steps (one token per row) read the past from the KV store's decode mirror, fed at its capacity with
   * the mask widened to match, and run with their rows in the mirror's slot order (logits rows, and so every
   * per-row output, keep the step's order); other steps assemble each row's past at exactly the step's length.
   */
  private pastFor(step: StepBatch) {
    const seqIds = step.rows.map((r) => r.seqId);
    const P = step.pastLength;
    if (step.seqLen !== 1) {
      return { batch: step, past: this.kv.assemble(seqIds, P), pastFed: P, mask: step.attentionMask };
    }
    const { keys, values, capacity, slots } = this.kv.assembleDecode(seqIds, P);
    const B = step.rows.length;
    const mask = new Uint8Array(B * (capacity + 1));
    for (let b = 0; b < B; b++) {
      const row = slots[b]! * (capacity + 1);
      mask.set(step.attentionMask.subarray(b * (P + 1), b * (P + 1) + P), row);
      mask[row + capacity] = step.attentionMask[b * (P + 1) + P]!;
    }
    return { batch: inSlotOrder(step, slots), past: { keys, values }, pastFed: capacity, mask };
  }

  release(seqIds: readonly number[]): void {
    for (const id of seqIds) this.kv.free(id);
  }

  async seedPrefix(
    seqId: number,
    length: number,
    keys: Float32Array[],
    values: Float32Array[],
  ): Promise<void> {
    this.kv.seed(seqId, length, keys, values);
  }

  async writeAdapterSlot(
    kind: AdapterPoolKind,
    slot: number,
    weights: SequenceAdapterWeights,
  ): Promise<void> {
    this.pools.writeSlot(kind, slot, weights);
  }

  async clearAdapterSlot(kind: AdapterPoolKind, slot: number): Promise<void> {
    this.pools.clearSlot(kind, slot);
  }

  async dispose(): Promise<void> {
    await this.session.dispose();
  }
}

/**
 * A one-token-a-row step with row b moved to `slots[b]`; logits_index keeps its order, pointing at the new rows.
 * The attention mask is left as the step's: pastFor builds the fed one, rows in slot order.
 */
function inSlotOrder(step: StepBatch, slots: readonly number[]): StepBatch {
  if (slots.every((slot, b) => slot === b)) return step;
  const permute = <A extends BigInt64Array>(values: A): A => {
    const out = new (values.constructor as new (n: number) => A)(values.length);
    slots.forEach((slot, b) => {
      out[slot] = values[b]!;
    });
    return out;
  };
  const rows = new Array<StepBatch["rows"][number]>(slots.length);
  slots.forEach((slot, b) => {
    rows[slot] = step.rows[b]!;
  });
  return {
    ...step,
    rows,
    inputIds: permute(step.inputIds),
    positionIds: permute(step.positionIds),
    // With one token a row, a flat index b * T + t is the row b itself.
    logitsIndex: BigInt64Array.from(step.logitsIndex, (b) => BigInt(slots[Number(b)]!)),
    loraSlots: permute(step.loraSlots),
    ia3Slots: permute(step.ia3Slots),
    bottleneckSlots: permute(step.bottleneckSlots),
  };
}
