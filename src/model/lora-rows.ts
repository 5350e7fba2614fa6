/**
 * @module model/lora-rows — each batch row's own copy of its LoRA weights, per layer, kept between steps.
 *
 * The graph multiplies row b's activations by row b's A and B ([B, in, r] and [B, r, out] per layer and
 * projection). Gathering those from the slot pool inside the graph copied them every step (about 470 MB a step
 * for q,k,v,o at rank 16 and 32 rows, a sixth of the step); here a row is copied from the pool only when its
 * slot changes, or the slot is rewritten, and the step feeds the rows in place. Memory: the rows seen at once,
 * times one slot's weights for the projections in use.
 */
import { INPUT, type Projection, projectionDims } from "./contract.ts";
import type { ModelSpec } from "./model-spec.ts";
import type { FeedValue } from "./session.ts";

/** One projection's slot pool: A as [slot * L + layer][in][r], B as [slot * L + layer][r][out]. */
export interface LoraPool {
  a: Float32Array;
  b: Float32Array;
}

/** Rows are allocated in blocks of this many, so a batch that grows by one does not reallocate. */
const ROW_BLOCK = 8;

interface ProjectionRows {
  /** [layer][row][in][r] over `capacity` rows a layer */
  a: Float32Array;
  /** [layer][row][r][out] */
  b: Float32Array;
  /** per row: the slot and that slot's version its copy holds (-1: none) */
  slot: Int32Array;
  version: Int32Array;
}

export class LoraRows {
  private capacity = 0;
  private readonly rows = new Map<Projection, ProjectionRows>();

  constructor(
    private readonly spec: ModelSpec,
    private readonly rank: number,
  ) {}

  /** Rows currently allocated (for tests and memory accounting). */
  get allocatedRows(): number {
    return this.capacity;
  }

  /**
   * Feeds for projection `m` in a step whose rows use `slots`: every row holds its slot's weights (copied now
   * if it held another slot, or an older version of this one), fed per layer as [B, in, r] and [B, r, out].
   */
  feeds(
    m: Projection,
    pool: LoraPool,
    slots: ArrayLike<bigint>,
    versionOf: (slot: number) => number,
    into: Record<string, FeedValue>,
  ): void {
    const B = slots.length;
    this.ensureCapacity(B);
    const rows = this.rowsOf(m);
    const { inDim, outDim } = projectionDims(this.spec, m);
    const L = this.spec.numLayers;
    const aSize = inDim * this.rank;
    const bSize = this.rank * outDim;
    for (let i = 0; i < B; i++) {
      const slot = Number(slots[i]);
      const version = versionOf(slot);
      if (rows.slot[i] === slot && rows.version[i] === version) continue;
      for (let l = 0; l < L; l++) {
        const poolRow = slot * L + l;
        const cacheRow = l * this.capacity + i;
        rows.a.set(pool.a.subarray(poolRow * aSize, (poolRow + 1) * aSize), cacheRow * aSize);
        rows.b.set(pool.b.subarray(poolRow * bSize, (poolRow + 1) * bSize), cacheRow * bSize);
      }
      rows.slot[i] = slot;
      rows.version[i] = version;
    }
    for (let l = 0; l < L; l++) {
      const first = l * this.capacity;
      into[INPUT.loraA(l, m)] = {
        type: "float32",
        data: rows.a.subarray(first * aSize, (first + B) * aSize),
        dims: [B, inDim, this.rank],
      };
      into[INPUT.loraB(l, m)] = {
        type: "float32",
        data: rows.b.subarray(first * bSize, (first + B) * bSize),
        dims: [B, this.rank, outDim],
      };
    }
  }

  private ensureCapacity(rowsNeeded: number): void {
    if (rowsNeeded <= this.capacity) return;
    // Growing re-lays every layer's rows; the copies are rebuilt on the next feeds (rare: the batch's peak).
    this.capacity = Math.ceil(rowsNeeded / ROW_BLOCK) * ROW_BLOCK;
    this.rows.clear();
  }

  private rowsOf(m: Projection): ProjectionRows {
    let rows = this.rows.get(m);
    if (!rows) {
      const { inDim, outDim } = projectionDims(this.spec, m);
      const perLayer = this.capacity * this.rank;
      rows = {
        a: new Float32Array(this.spec.numLayers * perLayer * inDim),
        b: new Float32Array(this.spec.numLayers * perLayer * outDim),
        slot: new Int32Array(this.capacity).fill(-1),
        version: new Int32Array(this.capacity).fill(-1),
      };
      this.rows.set(m, rows);
    }
    return rows;
  }
}
