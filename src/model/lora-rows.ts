/**
 * @module model/lora-rows — each batch row's own copy of its LoRA weights, per layer, kept between steps.
 *
 * The graph multiplies row b's activations by row b's A and B ([B, in, r] and [B, r, out] per layer and
 * projection). Gathering those from the slot pool inside the graph copied them every step (about 470 MB a step
 * for q,k,v,o at rank 16 and 32 rows, a sixth of the step); here a row is copied from the pool only when its
 * slot changes, or the slot is rewritten, and the step feeds the rows in place. Rows hold the largest rank a
 * resident adapter has on the projection, not the pool's (--max-lora-rank) zero-padded one. Memory: the rows
 * seen at once, times one adapter's weights at that rank for the projections in use.
 */
import { INPUT, type Projection, projectionDims } from "./contract.ts";
import type { ModelSpec } from "./model-spec.ts";
import type { FeedValue } from "./session.ts";

/** One projection's slot pool: A as [slot * L + layer][in][rank], B as [slot * L + layer][rank][out]. */
export interface LoraPool {
  a: Float32Array;
  b: Float32Array;
  /** the pool's rank (--max-lora-rank): adapters of lower rank are zero-padded to it */
  rank: number;
}

/** Rows are allocated in blocks of this many, so a batch that grows by one does not reallocate. */
const ROW_BLOCK = 8;
/**
 * Steps in a row without any LoRA after which the copies are freed (seconds of serving at these step rates):
 * a burst of LoRA traffic should not hold its peak memory for the life of the process, and re-making the
 * copies for the next LoRA step costs about a step.
 */
export const LORA_ROWS_IDLE_STEPS = 512;

interface ProjectionRows {
  /** the rank the rows hold (the pool's first `rank` columns) */
  rank: number;
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
  private stepsWithoutLora = 0;

  constructor(private readonly spec: ModelSpec) {}

  /** Rows currently allocated (for tests and memory accounting). */
  get allocatedRows(): number {
    return this.capacity;
  }

  /** Count a step that used no LoRA; after LORA_ROWS_IDLE_STEPS of them the copies are freed. */
  idleStep(): void {
    if (this.capacity === 0 || ++this.stepsWithoutLora < LORA_ROWS_IDLE_STEPS) return;
    this.capacity = 0;
    this.rows.clear();
  }

  /**
   * Feeds for projection `m` in a step whose rows use `slots`: every row holds its slot's weights at `rank`
   * (copied now if it held another slot, an older version of this one, or another rank), fed per layer as
   * [B, in, rank] and [B, rank, out].
   */
  feeds(
    m: Projection,
    pool: LoraPool,
    rank: number,
    slots: ArrayLike<bigint>,
    versionOf: (slot: number) => number,
    into: Record<string, FeedValue>,
  ): void {
    const B = slots.length;
    this.stepsWithoutLora = 0;
    this.ensureCapacity(B);
    const rows = this.rowsOf(m, rank);
    const { inDim, outDim } = projectionDims(this.spec, m);
    const L = this.spec.numLayers;
    const aSize = inDim * rank;
    const bSize = rank * outDim;
    for (let i = 0; i < B; i++) {
      const slot = Number(slots[i]);
      const version = versionOf(slot);
      if (rows.slot[i] === slot && rows.version[i] === version) continue;
      for (let l = 0; l < L; l++) {
        const poolRow = slot * L + l;
        const cacheRow = l * this.capacity + i;
        copyColumns(pool.a, poolRow * inDim * pool.rank, pool.rank, rows.a, cacheRow * aSize, rank, inDim);
        // B's first `rank` rows are contiguous in the pool.
        const bFrom = poolRow * pool.rank * outDim;
        rows.b.set(pool.b.subarray(bFrom, bFrom + bSize), cacheRow * bSize);
      }
      rows.slot[i] = slot;
      rows.version[i] = version;
    }
    for (let l = 0; l < L; l++) {
      const first = l * this.capacity;
      into[INPUT.loraA(l, m)] = {
        type: "float32",
        data: rows.a.subarray(first * aSize, (first + B) * aSize),
        dims: [B, inDim, rank],
      };
      into[INPUT.loraB(l, m)] = {
        type: "float32",
        data: rows.b.subarray(first * bSize, (first + B) * bSize),
        dims: [B, rank, outDim],
      };
    }
  }

  private ensureCapacity(rowsNeeded: number): void {
    if (rowsNeeded <= this.capacity) return;
    // Growing re-lays every layer's rows; the copies are rebuilt on the next feeds (rare: the batch's peak).
    this.capacity = Math.ceil(rowsNeeded / ROW_BLOCK) * ROW_BLOCK;
    this.rows.clear();
  }

  private rowsOf(m: Projection, rank: number): ProjectionRows {
    let rows = this.rows.get(m);
    if (!rows || rows.rank !== rank) {
      const { inDim, outDim } = projectionDims(this.spec, m);
      const perLayer = this.capacity * rank;
      rows = {
        rank,
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

/** Copy the first `width` columns of `rows` rows of a row-major matrix `stride` wide into a dense one. */
function copyColumns(
  from: Float32Array,
  fromOffset: number,
  stride: number,
  to: Float32Array,
  toOffset: number,
  width: number,
  rows: number,
): void {
  if (width === stride) {
    to.set(from.subarray(fromOffset, fromOffset + rows * width), toOffset);
    return;
  }
  for (let r = 0; r < rows; r++) {
    const src = fromOffset + r * stride;
    const dst = toOffset + r * width;
    for (let c = 0; c < width; c++) to[dst + c] = from[src + c]!;
  }
}
