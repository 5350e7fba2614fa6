/**
 * @module engine/step-builder — turns the scheduled work of one step into a StepBatch: padded ids and
 * positions, the attention mask, the rows that need logits, step-local virtual-token rows and per-row
 * adapter slots. The single place that knows the graph's input layout.
 */
import type { StepBatch } from "../model/contract.ts";

/** What one scheduled sequence contributes to a step. */
export interface StepWork {
  seqId: number;
  /** New tokens this step; ids >= vocabSize address row (id - vocabSize) of `virtualTable`. */
  tokens: readonly number[];
  /** Tokens already in the sequence's KV cache; the first new token sits at this position. */
  pastLength: number;
  /** Which of the new tokens need logits back. */
  logits: "last" | "all" | "none";
  /**
   * Whether the engine reads those rows' logit values (sampling, logprobs, scoring) rather than only their
   * greedy token; default true. A step fetches the [R, V] logits only if some work does.
   */
  readsLogitValues?: boolean;
  /** [n, D] soft-prompt rows this sequence's virtual ids address. */
  virtualTable?: Float32Array;
  loraSlot: number;
  ia3Slot: number;
  bottleneckSlot: number;
}

/** Logits row r of the step result belongs to work item `work`, new-token index `token`. */
export interface LogitsOwner {
  work: number;
  token: number;
}

export interface BuiltStep {
  batch: StepBatch;
  owners: LogitsOwner[];
}

export function buildStep(works: readonly StepWork[], vocabSize: number, hiddenSize: number): BuiltStep {
  const B = works.length;
  const T = Math.max(1, ...works.map((w) => w.tokens.length));
  const P = Math.max(0, ...works.map((w) => w.pastLength));
  const S = P + T;
  const inputIds = new BigInt64Array(B * T);
  const positionIds = new BigInt64Array(B * T);
  const attentionMask = new Uint8Array(B * T * S);
  const logitsIndex: bigint[] = [];
  const owners: LogitsOwner[] = [];
  const { table, offsets } = collectVirtualRows(works, vocabSize, hiddenSize);

  works.forEach((w, b) => {
    const n = w.tokens.length;
    for (let t = 0; t < T; t++) {
      const flat = b * T + t;
      const maskRow = flat * S;
      if (t < n) {
        const id = w.tokens[t]!;
        inputIds[flat] = BigInt(id >= vocabSize ? vocabSize + offsets[b]! + (id - vocabSize) : id);
        positionIds[flat] = BigInt(w.pastLength + t);
        attentionMask.fill(1, maskRow, maskRow + w.pastLength);
        attentionMask.fill(1, maskRow + P, maskRow + P + t + 1);
      } else {
        // Padding rows attend to themselves only: a fully masked softmax row would be NaN.
        positionIds[flat] = BigInt(w.pastLength);
        attentionMask[maskRow + P + t] = 1;
      }
    }
    const wanted = w.logits === "all" ? [...Array(n).keys()] : w.logits === "last" && n > 0 ? [n - 1] : [];
    for (const t of wanted) {
      logitsIndex.push(BigInt(b * T + t));
      owners.push({ work: b, token: t });
    }
  });

  const slots = (pick: (w: StepWork) => number) => BigInt64Array.from(works, (w) => BigInt(pick(w)));
  return {
    batch: {
      rows: works.map((w) => ({ seqId: w.seqId, pastLength: w.pastLength, numNewTokens: w.tokens.length })),
      seqLen: T,
      pastLength: P,
      inputIds,
      positionIds,
      attentionMask,
      logitsIndex: BigInt64Array.from(logitsIndex),
      virtualEmbeddings: table,
      loraSlots: slots((w) => w.loraSlot),
      ia3Slots: slots((w) => w.ia3Slot),
      bottleneckSlots: slots((w) => w.bottleneckSlot),
      fetchLogits: works.some((w) => w.logits !== "none" && (w.readsLogitValues ?? true)),
    },
    owners,
  };
}

/** Concatenate the virtual tables this step uses (each once); row 0 stays a zero pad so N >= 1. */
function collectVirtualRows(works: readonly StepWork[], vocabSize: number, hiddenSize: number) {
  const offsets: number[] = [];
  const placed = new Map<Float32Array, number>();
  let numRows = 1;
  for (const w of works) {
    if (!w.virtualTable || !w.tokens.some((id) => id >= vocabSize)) {
      offsets.push(0);
      continue;
    }
    let offset = placed.get(w.virtualTable);
    if (offset === undefined) {
      offset = numRows;
      placed.set(w.virtualTable, offset);
      numRows += w.virtualTable.length / hiddenSize;
    }
    offsets.push(offset);
  }
  const table = new Float32Array(numRows * hiddenSize);
  for (const [rows, offset] of placed) table.set(rows, offset * hiddenSize);
  return { table, offsets };
}
