/**
 * @module model/kv-store — per-sequence K/V buffers (owned by the model worker). Each step assembles the
 * past of the scheduled rows into reusable scratch tensors at exactly the needed length, and appends the
 * new rotated K/V the graph returns; whole caches never travel through onnxruntime outputs (ort-facts §1).
 */

interface SequenceKv {
  length: number;
  capacity: number;
  /** per layer [KVH, capacity, HS] */
  keys: Float32Array[];
  values: Float32Array[];
}

export interface KvShape {
  numLayers: number;
  numKvHeads: number;
  headDim: number;
}

const MIN_CAPACITY = 64;
/**
 * The decode mirror's capacity grows in steps of this many positions. Decode attention reads all `capacity`
 * positions, so slack costs every step, while a regrowth re-copies every row's past once per step size:
 * 32 keeps the slack near 16 positions at the price of one re-copy every 32 steps.
 */
const MIRROR_GRANULE = 32;

/**
 * The past of the rows of the last decode step, laid out [B, KVH, capacity, HS]: while the same rows keep
 * decoding, each step only copies in the token appended since, instead of re-assembling every row's whole
 * past (which cost up to 40% of a 32-row step). The graph is fed `capacity` positions; the mask hides the rest.
 */
interface DecodeMirror {
  rowsKey: string;
  capacity: number;
  /** Positions of each row already copied in. */
  lengths: number[];
  /** per layer views of exactly [B, KVH, capacity, HS] over `buffers` */
  keys: Float32Array[];
  values: Float32Array[];
  /** per layer allocations, with room for MIRROR_HEADROOM more granules (keys, then values) */
  buffers: { keys: Float32Array[]; values: Float32Array[] };
}

/**
 * Granules of room a new mirror allocation leaves: regrowing within it reuses the memory instead of allocating
 * (and page-faulting) fresh buffers, which at 32 rows took up to 350 ms once every 32 steps.
 */
const MIRROR_HEADROOM = 2;

/**
 * Copy `n` floats. A step moves one head's HS floats at a time (thousands of runs at 32 rows); for runs that
 * short a plain loop costs a fraction of subarray() + set(), which allocates a view per run.
 */
function copyFloats(dst: Float32Array, dstAt: number, src: Float32Array, srcAt: number, n: number): void {
  if (n > 256) {
    dst.set(src.subarray(srcAt, srcAt + n), dstAt);
    return;
  }
  for (let i = 0; i < n; i++) dst[dstAt + i] = src[srcAt + i]!;
}

export class KvStore {
  private readonly sequences = new Map<number, SequenceKv>();
  private scratchKeys: Float32Array[] = [];
  private scratchValues: Float32Array[] = [];
  private mirror: DecodeMirror | null = null;

  constructor(private readonly shape: KvShape) {}

  get numSequences(): number {
    return this.sequences.size;
  }

  lengthOf(seqId: number): number {
    return this.sequences.get(seqId)?.length ?? 0;
  }

  /** Bytes held by all sequence buffers (capacity, not just length). */
  get allocatedBytes(): number {
    let bytes = 0;
    for (const s of this.sequences.values()) bytes += s.keys.reduce((a, k) => a + k.byteLength * 2, 0);
    return bytes;
  }

  free(seqId: number): void {
    this.sequences.delete(seqId);
    this.mirror = null;
  }

  private ensure(seqId: number, needed: number): SequenceKv {
    const { numLayers, numKvHeads, headDim } = this.shape;
    let s = this.sequences.get(seqId);
    if (!s) {
      s = { length: 0, capacity: 0, keys: [], values: [] };
      this.sequences.set(seqId, s);
    }
    if (needed <= s.capacity) return s;
    const capacity = Math.max(MIN_CAPACITY, 2 ** Math.ceil(Math.log2(needed)));
    const grow = (old: Float32Array | undefined) => {
      const next = new Float32Array(numKvHeads * capacity * headDim);
      if (old && s.length > 0) {
        for (let h = 0; h < numKvHeads; h++) {
          next.set(
            old.subarray(h * s.capacity * headDim, (h * s.capacity + s.length) * headDim),
            h * capacity * headDim,
          );
        }
      }
      return next;
    };
    for (let l = 0; l < numLayers; l++) {
      s.keys[l] = grow(s.keys[l]);
      s.values[l] = grow(s.values[l]);
    }
    s.capacity = capacity;
    return s;
  }

  /** Write a prefix (prefix tuning) as the first `length` positions: per layer [KVH, length, HS]. */
  seed(seqId: number, length: number, keys: Float32Array[], values: Float32Array[]): void {
    this.mirror = null;
    const s = this.ensure(seqId, length);
    const { numKvHeads, headDim } = this.shape;
    for (let l = 0; l < this.shape.numLayers; l++) {
      for (let h = 0; h < numKvHeads; h++) {
        const src = h * length * headDim;
        s.keys[l]!.set(keys[l]!.subarray(src, src + length * headDim), h * s.capacity * headDim);
        s.values[l]!.set(values[l]!.subarray(src, src + length * headDim), h * s.capacity * headDim);
      }
    }
    s.length = length;
  }

  /** Past K/V of `seqIds` as [B, KVH, P, HS] views over scratch buffers (valid until the next call). */
  assemble(seqIds: readonly number[], pastLength: number): { keys: Float32Array[]; values: Float32Array[] } {
    const { numLayers, numKvHeads, headDim } = this.shape;
    const size = seqIds.length * numKvHeads * pastLength * headDim;
    const keys: Float32Array[] = [];
    const values: Float32Array[] = [];
    for (let l = 0; l < numLayers; l++) {
      if ((this.scratchKeys[l]?.length ?? -1) < size) {
        this.scratchKeys[l] = new Float32Array(Math.ceil(size * 1.25));
        this.scratchValues[l] = new Float32Array(Math.ceil(size * 1.25));
      }
      keys.push(this.scratchKeys[l]!.subarray(0, size));
      values.push(this.scratchValues[l]!.subarray(0, size));
    }
    seqIds.forEach((seqId, b) => {
      const s = this.sequences.get(seqId);
      const len = Math.min(s?.length ?? 0, pastLength);
      if (!s || len === 0) return;
      for (let l = 0; l < numLayers; l++) {
        for (let h = 0; h < numKvHeads; h++) {
          const src = h * s.capacity * headDim;
          const dst = (b * numKvHeads + h) * pastLength * headDim;
          keys[l]!.set(s.keys[l]!.subarray(src, src + len * headDim), dst);
          values[l]!.set(s.values[l]!.subarray(src, src + len * headDim), dst);
        }
      }
    });
    return { keys, values };
  }

  /**
   * Past K/V for a decode step of `seqIds` whose longest past is `pastLength`, as [B, KVH, capacity, HS]
   * views (capacity >= pastLength; positions past a row's length are stale and must be masked out).
   */
  assembleDecode(
    seqIds: readonly number[],
    pastLength: number,
  ): { keys: Float32Array[]; values: Float32Array[]; capacity: number } {
    const rowsKey = seqIds.join(",");
    let m = this.mirror;
    if (!m || m.rowsKey !== rowsKey || pastLength > m.capacity) {
      m = this.newMirror(
        rowsKey,
        seqIds.length,
        Math.ceil((pastLength + 1) / MIRROR_GRANULE) * MIRROR_GRANULE,
      );
    }
    const { numLayers, numKvHeads, headDim } = this.shape;
    seqIds.forEach((seqId, b) => {
      const s = this.sequences.get(seqId);
      const len = s?.length ?? 0;
      const from = m!.lengths[b]!;
      if (!s || len <= from) return;
      const n = (len - from) * headDim;
      for (let l = 0; l < numLayers; l++) {
        for (let h = 0; h < numKvHeads; h++) {
          const src = (h * s.capacity + from) * headDim;
          const dst = ((b * numKvHeads + h) * m!.capacity + from) * headDim;
          copyFloats(m!.keys[l]!, dst, s.keys[l]!, src, n);
          copyFloats(m!.values[l]!, dst, s.values[l]!, src, n);
        }
      }
      m!.lengths[b] = len;
    });
    return { keys: m.keys, values: m.values, capacity: m.capacity };
  }

  private newMirror(rowsKey: string, rows: number, capacity: number): DecodeMirror {
    const { numLayers, numKvHeads, headDim } = this.shape;
    const size = rows * numKvHeads * capacity * headDim;
    const old = this.mirror?.buffers;
    const reuse = old !== undefined && old.keys[0]!.length >= size;
    const allocation = rows * numKvHeads * (capacity + MIRROR_HEADROOM * MIRROR_GRANULE) * headDim;
    const fresh = () => Array.from({ length: numLayers }, () => new Float32Array(allocation));
    const buffers = reuse ? old : { keys: fresh(), values: fresh() };
    // Reused buffers may hold other rows' data: lengths start at 0, so every row is copied in afresh.
    this.mirror = {
      rowsKey,
      capacity,
      lengths: new Array(rows).fill(0),
      keys: buffers.keys.map((b) => b.subarray(0, size)),
      values: buffers.values.map((b) => b.subarray(0, size)),
      buffers,
    };
    return this.mirror;
  }

  /**
   * Append this step's K/V: `newKeys[l]` is [B, T, KVH*HS]; row b contributes its first `counts[b]` tokens
   * at positions `starts[b]`... (the sequence's current length must equal starts[b]).
   */
  append(
    seqIds: readonly number[],
    counts: readonly number[],
    seqLen: number,
    newKeys: Float32Array[],
    newValues: Float32Array[],
  ): void {
    const { numLayers, numKvHeads, headDim } = this.shape;
    const kvDim = numKvHeads * headDim;
    // A decode step's rows are the mirror's rows: their new positions go into the mirror too, so the next
    // step's assembleDecode finds nothing to copy.
    const m = this.mirror !== null && this.mirror.rowsKey === seqIds.join(",") ? this.mirror : null;
    seqIds.forEach((seqId, b) => {
      const count = counts[b]!;
      if (count === 0) return;
      const start = this.sequences.get(seqId)?.length ?? 0;
      const s = this.ensure(seqId, start + count);
      const intoMirror = m !== null && m.lengths[b] === start && start + count <= m.capacity;
      for (let l = 0; l < numLayers; l++) {
        const nk = newKeys[l]!;
        const nv = newValues[l]!;
        for (let t = 0; t < count; t++) {
          const srcRow = (b * seqLen + t) * kvDim;
          for (let h = 0; h < numKvHeads; h++) {
            const src = srcRow + h * headDim;
            const dst = (h * s.capacity + start + t) * headDim;
            copyFloats(s.keys[l]!, dst, nk, src, headDim);
            copyFloats(s.values[l]!, dst, nv, src, headDim);
            if (intoMirror) {
              const at = ((b * numKvHeads + h) * m.capacity + start + t) * headDim;
              copyFloats(m.keys[l]!, at, nk, src, headDim);
              copyFloats(m.values[l]!, at, nv, src, headDim);
            }
          }
        }
      }
      s.length = start + count;
      if (intoMirror) m.lengths[b] = start + count;
    });
  }

  /** Forget the last tokens of a sequence (used to re-run a step that failed). */
  truncate(seqId: number, length: number): void {
    this.mirror = null;
    const s = this.sequences.get(seqId);
    if (s && length < s.length) s.length = length;
  }
}
