/**
 * @module model/kv-store — per-sequence K/V buffers (owned by the model worker). Each step assembles the
 * past of the scheduled rows into reusable scratch tensors at exactly the needed length, and appends the
 * new rotated K/V the graph returns; whole caches never travel through onnxruntime outputs (ort-facts §1).
 */

interface SequenceKv {
  length: number;
  /**
   * Positions [0, synced) are in `keys`/`values`; [synced, length) exist only in the sequence's decode-mirror
   * slot (decode steps write the mirror alone), and are copied back by `sync` before anything reads the buffers
   * or the slot changes hands.
   */
  synced: number;
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
 * The past of the rows of recent decode steps, one slot a row, laid out [slots, KVH, capacity, HS]: while rows
 * keep decoding, each step only copies in the token appended since, instead of re-assembling every row's whole
 * past (which cost up to 40% of a 32-row step). A row keeps its slot while it stays in the batch, and a row that
 * joins takes a vacant slot, so one sequence finishing moves at most one other row (with rows laid out in step
 * order, every later row moved: at 32 rows with one finishing every 4 steps that averaged 34 ms a step). The
 * graph is fed the first B slots at `capacity` positions, in slot order; the mask hides the rest.
 */
interface DecodeMirror {
  capacity: number;
  /** The sequence in each slot (VACANT when none). */
  rows: number[];
  /** Positions of each slot's row already copied in. */
  lengths: number[];
  /** per layer allocations (slot stride: KVH x capacity x HS); `slots` is how many slots fit at this capacity */
  buffers: { keys: Float32Array[]; values: Float32Array[]; slots: number };
  /** The per-layer views the last step was fed (the first `rows` slots), reused while B and the buffers hold. */
  views: { rows: number; keys: Float32Array[]; values: Float32Array[] } | null;
}

const VACANT = -1;

/** Floats a mirror allocation holds: `rows` slots with room for MIRROR_HEADROOM more granules each. */
function mirrorAllocation(shape: KvShape, rows: number, capacity: number): number {
  return rows * shape.numKvHeads * (capacity + MIRROR_HEADROOM * MIRROR_GRANULE) * shape.headDim;
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
    this.vacate(seqId);
    // Idle: let go of the mirror's memory (up to slots x capacity of every layer).
    if (this.sequences.size === 0) this.mirror = null;
  }

  /** The sequence's mirror slot (if any) holds nothing from now on (what only it held is synced first). */
  private vacate(seqId: number): void {
    const m = this.mirror;
    if (!m) return;
    const slot = m.rows.indexOf(seqId);
    if (slot >= 0) {
      this.syncSlot(m, slot);
      m.rows[slot] = VACANT;
      m.lengths[slot] = 0;
    }
  }

  /** Copy the positions only the mirror holds back into the sequence's buffers. */
  private sync(seqId: number): void {
    const s = this.sequences.get(seqId);
    if (!s || s.synced >= s.length) return;
    const m = this.mirror;
    const slot = m ? m.rows.indexOf(seqId) : -1;
    // Positions only a mirror slot held, with no slot: a broken invariant, and the step must fail, not run on a
    // cache with a hole in it.
    if (!m || slot < 0)
      throw new Error(`kv-store: sequence ${seqId}'s newest positions are in no mirror slot`);
    this.syncSlot(m, slot);
  }

  private syncSlot(m: DecodeMirror, slot: number): void {
    const s = this.sequences.get(m.rows[slot]!);
    if (!s || s.synced >= s.length) return;
    const { numLayers, numKvHeads, headDim } = this.shape;
    const n = (s.length - s.synced) * headDim;
    for (let l = 0; l < numLayers; l++) {
      for (let h = 0; h < numKvHeads; h++) {
        const src = ((slot * numKvHeads + h) * m.capacity + s.synced) * headDim;
        const dst = (h * s.capacity + s.synced) * headDim;
        copyFloats(s.keys[l]!, dst, m.buffers.keys[l]!, src, n);
        copyFloats(s.values[l]!, dst, m.buffers.values[l]!, src, n);
      }
    }
    s.synced = s.length;
  }

  private ensure(seqId: number, needed: number): SequenceKv {
    const { numLayers, numKvHeads, headDim } = this.shape;
    let s = this.sequences.get(seqId);
    if (!s) {
      s = { length: 0, synced: 0, capacity: 0, keys: [], values: [] };
      this.sequences.set(seqId, s);
    }
    if (needed <= s.capacity) return s;
    const capacity = Math.max(MIN_CAPACITY, 2 ** Math.ceil(Math.log2(needed)));
    // Only the synced positions are in the buffers; the rest are stale until the mirror copies them back.
    const grow = (old: Float32Array | undefined) => {
      const next = new Float32Array(numKvHeads * capacity * headDim);
      if (old && s.synced > 0) {
        for (let h = 0; h < numKvHeads; h++) {
          next.set(
            old.subarray(h * s.capacity * headDim, (h * s.capacity + s.synced) * headDim),
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
    this.vacate(seqId);
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
    s.synced = length;
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
      this.sync(seqId);
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
   * Past K/V for a decode step of `seqIds` whose longest past is `pastLength`, as [B, KVH, capacity, HS] views
   * (capacity >= pastLength; positions past a row's length are stale and must be masked out) in slot order:
   * `slots[b]` is where row b of the step sits, and the graph must be fed the step's rows in that order.
   */
  assembleDecode(
    seqIds: readonly number[],
    pastLength: number,
  ): { keys: Float32Array[]; values: Float32Array[]; capacity: number; slots: number[] } {
    const B = seqIds.length;
    const needed = Math.ceil((pastLength + 1) / MIRROR_GRANULE) * MIRROR_GRANULE;
    let m = this.mirror;
    // A longer past re-lays every slot (the slot stride is capacity): rows start over in step order.
    if (!m || pastLength > m.capacity) m = this.newMirror(B, needed);
    const slots = this.placeRows(m, seqIds);
    const { numLayers, numKvHeads, headDim } = this.shape;
    seqIds.forEach((seqId, b) => {
      const slot = slots[b]!;
      const s = this.sequences.get(seqId);
      const len = s?.length ?? 0;
      const from = m.lengths[slot]!;
      if (!s || len <= from) return;
      const n = (len - from) * headDim;
      for (let l = 0; l < numLayers; l++) {
        for (let h = 0; h < numKvHeads; h++) {
          const src = (h * s.capacity + from) * headDim;
          const dst = ((slot * numKvHeads + h) * m.capacity + from) * headDim;
          copyFloats(m.buffers.keys[l]!, dst, s.keys[l]!, src, n);
          copyFloats(m.buffers.values[l]!, dst, s.values[l]!, src, n);
        }
      }
      m.lengths[slot] = len;
    });
    if (m.views?.rows !== B) {
      const size = B * numKvHeads * m.capacity * headDim;
      m.views = {
        rows: B,
        keys: m.buffers.keys.map((k) => k.subarray(0, size)),
        values: m.buffers.values.map((v) => v.subarray(0, size)),
      };
    }
    return { keys: m.views.keys, values: m.views.values, capacity: m.capacity, slots };
  }

  /**
   * Slots 0..B-1 for this step's rows: a row already in one of them stays; the others (rows new to the mirror,
   * and rows whose slot is B or beyond) take the vacated ones and are copied in afresh by the caller.
   */
  private placeRows(m: DecodeMirror, seqIds: readonly number[]): number[] {
    const B = seqIds.length;
    if (m.buffers.slots < B) this.growSlots(m, B);
    while (m.rows.length < B) {
      m.rows.push(VACANT);
      m.lengths.push(0);
    }
    const inStep = new Set(seqIds);
    const slots = new Array<number>(B).fill(VACANT);
    const kept = new Set<number>();
    seqIds.forEach((seqId, b) => {
      const slot = m.rows.indexOf(seqId);
      if (slot >= 0 && slot < B) {
        slots[b] = slot;
        kept.add(slot);
      }
    });
    const free: number[] = [];
    for (let slot = B - 1; slot >= 0; slot--) if (!kept.has(slot)) free.push(slot);
    seqIds.forEach((seqId, b) => {
      if (slots[b] !== VACANT) return;
      const slot = free.pop()!;
      // The new slot is filled from the row's buffers, and its old owner (a row this step leaves out) loses it.
      this.sync(seqId);
      this.syncSlot(m, slot);
      slots[b] = slot;
      m.rows[slot] = seqId;
      m.lengths[slot] = 0;
    });
    // Slots past B hold rows this step left out; they are refilled from the store if those rows come back.
    for (let slot = B; slot < m.rows.length; slot++) {
      if (!inStep.has(m.rows[slot]!)) continue;
      m.rows[slot] = VACANT;
      m.lengths[slot] = 0;
    }
    return slots;
  }

  /** Room for `rows` slots at the mirror's capacity: bigger buffers, the rows already in copied over. */
  private growSlots(m: DecodeMirror, rows: number): void {
    const { numKvHeads, headDim } = this.shape;
    const allocation = mirrorAllocation(this.shape, rows, m.capacity);
    const used = m.rows.length * numKvHeads * m.capacity * headDim;
    const grow = (old: Float32Array) => {
      const next = new Float32Array(allocation);
      next.set(old.subarray(0, used));
      return next;
    };
    m.buffers = {
      keys: m.buffers.keys.map(grow),
      values: m.buffers.values.map(grow),
      slots: Math.floor(allocation / (numKvHeads * m.capacity * headDim)),
    };
    m.views = null;
  }

  /** A mirror of `rows` empty slots at `capacity`, over the old buffers when they are big enough. */
  private newMirror(rows: number, capacity: number): DecodeMirror {
    const { numLayers, numKvHeads, headDim } = this.shape;
    const previous = this.mirror;
    // Every row starts over from its buffers (and the old buffers may be reused): sync what only they held.
    if (previous) for (let slot = 0; slot < previous.rows.length; slot++) this.syncSlot(previous, slot);
    const old = previous?.buffers;
    const size = rows * numKvHeads * capacity * headDim;
    const reuse = old !== undefined && old.keys[0]!.length >= size;
    const allocation = reuse ? old.keys[0]!.length : mirrorAllocation(this.shape, rows, capacity);
    const fresh = () => Array.from({ length: numLayers }, () => new Float32Array(allocation));
    this.mirror = {
      capacity,
      rows: [],
      lengths: [],
      buffers: {
        keys: reuse ? old.keys : fresh(),
        values: reuse ? old.values : fresh(),
        slots: Math.floor(allocation / (numKvHeads * capacity * headDim)),
      },
      views: null,
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
    // A decode step's rows are mirror rows, fed in slot order (`seqIds` are the graph's rows): their new
    // positions go into the mirror only (each a cache-missing write: writing the buffers too doubled the
    // append), and reach the sequence's buffers when `sync` needs them there.
    const m = this.mirror;
    seqIds.forEach((seqId, b) => {
      const count = counts[b]!;
      if (count === 0) return;
      const start = this.sequences.get(seqId)?.length ?? 0;
      const s = this.ensure(seqId, start + count);
      const intoMirror =
        m !== null && m.rows[b] === seqId && m.lengths[b] === start && start + count <= m.capacity;
      if (!intoMirror) this.sync(seqId);
      for (let l = 0; l < numLayers; l++) {
        const nk = newKeys[l]!;
        const nv = newValues[l]!;
        for (let t = 0; t < count; t++) {
          const srcRow = (b * seqLen + t) * kvDim;
          for (let h = 0; h < numKvHeads; h++) {
            const src = srcRow + h * headDim;
            if (intoMirror) {
              const at = ((b * numKvHeads + h) * m.capacity + start + t) * headDim;
              copyFloats(m.buffers.keys[l]!, at, nk, src, headDim);
              copyFloats(m.buffers.values[l]!, at, nv, src, headDim);
            } else {
              const dst = (h * s.capacity + start + t) * headDim;
              copyFloats(s.keys[l]!, dst, nk, src, headDim);
              copyFloats(s.values[l]!, dst, nv, src, headDim);
            }
          }
        }
      }
      s.length = start + count;
      if (intoMirror) m.lengths[b] = start + count;
      else s.synced = s.length;
    });
  }

  /** Forget the last tokens of a sequence (used to re-run a step that failed). */
  truncate(seqId: number, length: number): void {
    this.vacate(seqId);
    const s = this.sequences.get(seqId);
    if (s && length < s.length) {
      s.length = length;
      s.synced = Math.min(s.synced, length);
    }
  }
}
