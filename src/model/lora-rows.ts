/**
 * @module model/lora-rows — each batch row's own copy of its LoRA weights, per layer and site, kept between steps.
 *
 * The graph multiplies row b's activations by row b's A and B, per layer and site (contract.ts: a fused product
 * and the projections in it). Gathering those from the slot pool inside the graph copied them every step (about
 * 470 MB a step for q,k,v,o at rank 16 and 32 rows, a sixth of the step); here a row is copied from the pool only
 * when its slot changes, or the slot is rewritten, and the step feeds the rows in place. Rows hold the largest
 * rank a resident adapter has at the site, not the pool's (--max-lora-rank) zero-padded one, and only the site's
 * projections some resident adapter targets (its parts). Memory: the rows seen at once, times one adapter's
 * weights at that rank for the parts in use.
 */
import {
  INPUT,
  isSharedInputSite,
  loraInputDims,
  type Projection,
  projectionDims,
  type Site,
  type SiteLayout,
} from "./contract.ts";
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

interface SiteRows {
  /** the rank the rows hold (the pool's first `rank` columns) */
  rank: number;
  /** the site's projections the rows hold, in site order (J of them) */
  parts: readonly Projection[];
  /** [layer][row][part][in][r] over `capacity` rows a layer */
  a: Float32Array;
  /** [layer][row][r][width]: each part's B at its columns of the site's output, zeros elsewhere */
  b: Float32Array;
  /** per block of the site's output columns, the block of the parts' products holding it (shared-input sites) */
  columns: FeedValue | null;
  /** per row: the slot and that slot's version its copy holds (-1: none) */
  slot: Int32Array;
  version: Int32Array;
}

/** A site's rows at rank 0, one row broadcasting over the batch: what a step that does not target the site gets. */
export function zeroRankLora(spec: ModelSpec, layout: SiteLayout): Record<string, FeedValue> {
  const { inDim } = projectionDims(spec, layout.parts[0]!);
  const dims = loraInputDims(layout, { rows: 1, parts: 1, inDim, rank: 0 });
  const empty = new Float32Array(0);
  const a: FeedValue = { type: "float32", data: empty, dims: dims.a };
  const b: FeedValue = { type: "float32", data: empty, dims: dims.b };
  const feeds: Record<string, FeedValue> = {};
  for (let l = 0; l < spec.numLayers; l++) {
    feeds[INPUT.loraA(l, layout.site)] = a;
    feeds[INPUT.loraB(l, layout.site)] = b;
  }
  // At rank 0 every product is zero, so the one part's own blocks do.
  if (dims.columns) feeds[INPUT.loraColumns(layout.site)] = partColumns(spec, layout, []);
  return feeds;
}

/**
 * lora_columns for `parts` at a site (contract.ts): block q of the site's output comes from the product of the part
 * whose columns hold it, block j * (width / block) + q of the parts' products side by side. Columns no part holds
 * take part 0's block: B is zero there, so every part's product is.
 */
function partColumns(spec: ModelSpec, layout: SiteLayout, parts: readonly Projection[]): FeedValue {
  const blocks = layout.width / layout.block;
  const data = new BigInt64Array(blocks);
  for (let q = 0; q < blocks; q++) {
    const column = q * layout.block;
    const j = parts.findIndex((m) => {
      const start = layout.columns.get(m)!;
      return column >= start && column < start + projectionDims(spec, m).outDim;
    });
    data[q] = BigInt(Math.max(j, 0) * blocks + q);
  }
  return { type: "int64", data, dims: [blocks] };
}

export class LoraRows {
  private capacity = 0;
  private readonly rows = new Map<Site, SiteRows>();
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
   * Feeds for `site` in a step whose rows use `slots`: every row holds its slot's weights for `parts` at `rank`
   * (copied now if it held another slot, an older version of this one, or another rank or parts).
   */
  feeds(
    site: SiteLayout,
    parts: readonly Projection[],
    rank: number,
    pools: ReadonlyMap<Projection, LoraPool>,
    slots: ArrayLike<bigint>,
    versionOf: (slot: number) => number,
    into: Record<string, FeedValue>,
  ): void {
    const B = slots.length;
    this.stepsWithoutLora = 0;
    this.ensureCapacity(B);
    const rows = this.rowsOf(site, parts, rank);
    const { inDim } = projectionDims(this.spec, parts[0]!);
    const L = this.spec.numLayers;
    const J = parts.length;
    const aSize = J * inDim * rank;
    const bSize = rank * site.width;
    for (let i = 0; i < B; i++) {
      const slot = Number(slots[i]);
      const version = versionOf(slot);
      if (rows.slot[i] === slot && rows.version[i] === version) continue;
      for (let l = 0; l < L; l++) {
        const poolRow = slot * L + l;
        const cacheRow = l * this.capacity + i;
        parts.forEach((m, j) => {
          const pool = pools.get(m)!;
          const outDim = projectionDims(this.spec, m).outDim;
          const aTo = cacheRow * aSize + j * inDim * rank;
          copyColumns(pool.a, poolRow * inDim * pool.rank, pool.rank, rows.a, aTo, rank, inDim);
          // B's first `rank` rows, each into this part's columns of the site's width.
          const column = site.columns.get(m)!;
          for (let k = 0; k < rank; k++) {
            const from = (poolRow * pool.rank + k) * outDim;
            rows.b.set(pool.b.subarray(from, from + outDim), cacheRow * bSize + k * site.width + column);
          }
        });
      }
      rows.slot[i] = slot;
      rows.version[i] = version;
    }
    const dims = loraInputDims(site, { rows: B, parts: J, inDim, rank });
    for (let l = 0; l < L; l++) {
      const first = l * this.capacity;
      into[INPUT.loraA(l, site.site)] = {
        type: "float32",
        data: rows.a.subarray(first * aSize, (first + B) * aSize),
        dims: dims.a,
      };
      into[INPUT.loraB(l, site.site)] = {
        type: "float32",
        data: rows.b.subarray(first * bSize, (first + B) * bSize),
        dims: dims.b,
      };
    }
    if (rows.columns) into[INPUT.loraColumns(site.site)] = rows.columns;
  }

  private ensureCapacity(rowsNeeded: number): void {
    if (rowsNeeded <= this.capacity) return;
    // Growing re-lays every layer's rows; the copies are rebuilt on the next feeds (rare: the batch's peak).
    this.capacity = Math.ceil(rowsNeeded / ROW_BLOCK) * ROW_BLOCK;
    this.rows.clear();
  }

  private rowsOf(site: SiteLayout, parts: readonly Projection[], rank: number): SiteRows {
    let rows = this.rows.get(site.site);
    if (!rows || rows.rank !== rank || rows.parts.join() !== parts.join()) {
      const { inDim } = projectionDims(this.spec, parts[0]!);
      const perLayer = this.capacity * rank;
      rows = {
        rank,
        parts: [...parts],
        a: new Float32Array(this.spec.numLayers * perLayer * parts.length * inDim),
        b: new Float32Array(this.spec.numLayers * perLayer * site.width),
        columns: isSharedInputSite(site.site) ? partColumns(this.spec, site, parts) : null,
        slot: new Int32Array(this.capacity).fill(-1),
        version: new Int32Array(this.capacity).fill(-1),
      };
      this.rows.set(site.site, rows);
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
