/**
 * @module model/peft-pools — fixed-size pools of resident PEFT weights, fed to the graph every step.
 * Slot 0 of every kind is the identity (LoRA zeros, IA3 ones, bottleneck zeros). Layout: see contract.ts
 * (row = slot * numLayers + layer). A step where no row uses a kind is fed a zero-rank identity pool (the
 * graph then runs a decoder copy without that kind's paths, so the pool costs only its binding); likewise a
 * LoRA site (contract.ts SITES) that none of the step's adapters targets is fed at rank 0. LoRA weights reach the
 * graph as per-row copies per site (lora-rows.ts); IA3 vectors are pooled per site.
 */
import {
  BOTTLENECK_PLACES,
  type BottleneckPlace,
  hasIa3WideFlag,
  IA3_WIDE_SITES,
  INPUT,
  ia3Sites,
  loraSites,
  moduleKey,
  type PeftLayout,
  type Projection,
  projectionDims,
  type SequenceAdapterWeights,
  type Site,
  type SiteLayout,
} from "./contract.ts";
import { type LoraPool, LoraRows, zeroRankLora } from "./lora-rows.ts";
import type { ModelSpec } from "./model-spec.ts";
import type { FeedValue } from "./session.ts";

export type PoolKind = "lora" | "ia3" | "bottleneck";

export interface PoolCapacity {
  /** Resident adapters per kind, excluding the identity slot 0. */
  loraSlots: number;
  maxLoraRank: number;
  ia3Slots: number;
  bottleneckSlots: number;
  maxBottleneckSize: number;
}

const EMPTY = new Float32Array(0);
const f32 = (data: Float32Array, dims: number[]): FeedValue => ({ type: "float32", data, dims });

const IA3_WIDE: FeedValue = { type: "bool", data: Uint8Array.of(1), dims: [] };

export class PeftPools {
  private lora = new Map<Projection, LoraPool>();
  /** one pool per IA3 site of the layout (contract.ts SITES) */
  private ia3 = new Map<Site, Float32Array>();
  private readonly ia3Sites: readonly SiteLayout[];
  private readonly loraSites: readonly SiteLayout[];
  private bottleneck = new Map<
    BottleneckPlace,
    { down: Float32Array; downBias: Float32Array; up: Float32Array; upBias: Float32Array }
  >();
  /**
   * Every pool input at its identity (zero-rank LoRA and bottleneck, all-ones IA3): fed as the step's defaults, so
   * one stable object serves every step and `feeds` returns only what a step changes.
   */
  readonly defaults: Readonly<Record<string, FeedValue>>;
  /** LoRA slot -> the projections its adapter has weights for, and its rank on each. */
  private readonly loraTargetsOf = new Map<number, Map<Projection, number>>();
  /** IA3 slot -> the sites its adapter scales, for ia3_wide. */
  private readonly ia3SitesOf = new Map<number, Set<Site>>();
  /** Whether the graph has the ia3_wide input (contract.ts hasIa3WideFlag). */
  private readonly hasIa3Wide: boolean;
  /** LoRA slot -> how many times it was written or cleared, so row copies of an older adapter are refreshed. */
  private readonly loraVersions = new Map<number, number>();
  private readonly loraRows: LoraRows;

  constructor(
    private readonly spec: ModelSpec,
    private readonly layout: PeftLayout,
    readonly capacity: PoolCapacity,
  ) {
    const L = spec.numLayers;
    const D = spec.hiddenSize;
    this.loraRows = new LoraRows(spec);
    this.ia3Sites = ia3Sites(spec, layout.ia3Targets);
    this.loraSites = loraSites(spec, layout.loraTargets);
    const identity: Record<string, FeedValue> = {};
    this.defaults = identity;
    for (const site of this.loraSites) Object.assign(identity, zeroRankLora(spec, site));
    for (const { site, width } of this.ia3Sites) {
      identity[INPUT.ia3(site)] = f32(new Float32Array(L * width).fill(1), [L, width]);
    }
    this.hasIa3Wide = hasIa3WideFlag(layout);
    if (this.hasIa3Wide) identity[INPUT.ia3Wide] = { type: "bool", data: Uint8Array.of(0), dims: [] };
    if (layout.bottleneck) {
      for (const p of BOTTLENECK_PLACES) {
        identity[INPUT.bottleneckDown(p)] = f32(new Float32Array(0), [L, D, 0]);
        identity[INPUT.bottleneckDownBias(p)] = f32(new Float32Array(0), [L, 0]);
        identity[INPUT.bottleneckUp(p)] = f32(new Float32Array(0), [L, 0, D]);
        identity[INPUT.bottleneckUpBias(p)] = f32(new Float32Array(L * D), [L, D]);
      }
    }
  }

  private rows(slots: number): number {
    return (slots + 1) * this.spec.numLayers;
  }

  private allocate(kind: PoolKind): void {
    const { spec, capacity } = this;
    const D = spec.hiddenSize;
    if (kind === "lora" && this.lora.size === 0) {
      const rows = this.rows(capacity.loraSlots);
      const r = capacity.maxLoraRank;
      for (const m of this.layout.loraTargets) {
        const { inDim, outDim } = projectionDims(spec, m);
        this.lora.set(m, {
          a: new Float32Array(rows * inDim * r),
          b: new Float32Array(rows * r * outDim),
          rank: r,
        });
      }
    } else if (kind === "ia3" && this.ia3.size === 0) {
      for (const { site, width } of this.ia3Sites) {
        this.ia3.set(site, new Float32Array(this.rows(capacity.ia3Slots) * width).fill(1));
      }
    } else if (kind === "bottleneck" && this.bottleneck.size === 0) {
      const rows = this.rows(capacity.bottleneckSlots);
      const size = capacity.maxBottleneckSize;
      for (const p of BOTTLENECK_PLACES) {
        this.bottleneck.set(p, {
          down: new Float32Array(rows * D * size),
          downBias: new Float32Array(rows * size),
          up: new Float32Array(rows * size * D),
          upBias: new Float32Array(rows * D),
        });
      }
    }
  }

  /** Write one adapter's weights into `slot` (1-based); modules it does not touch become identity. */
  writeSlot(kind: PoolKind, slot: number, weights: SequenceAdapterWeights): void {
    this.allocate(kind);
    this.clearSlot(kind, slot);
    if (kind === "lora") this.bumpLoraVersion(slot);
    const L = this.spec.numLayers;
    for (let l = 0; l < L; l++) {
      const row = slot * L + l;
      if (kind === "lora") this.writeLora(row, l, slot, weights);
      if (kind === "ia3") {
        for (const { site, width, columns } of this.ia3Sites) {
          for (const [m, column] of columns) {
            const v = weights.ia3?.get(moduleKey(l, m));
            if (!v) continue;
            this.ia3.get(site)!.set(v, row * width + column);
            const sites = this.ia3SitesOf.get(slot) ?? new Set<Site>();
            this.ia3SitesOf.set(slot, sites.add(site));
          }
        }
      }
      if (kind === "bottleneck") this.writeBottleneck(row, l, weights);
    }
  }

  private writeLora(row: number, l: number, slot: number, weights: SequenceAdapterWeights) {
    const r = this.capacity.maxLoraRank;
    for (const [m, pool] of this.lora) {
      const w = weights.lora?.get(moduleKey(l, m));
      if (!w) continue;
      const targets = this.loraTargetsOf.get(slot) ?? new Map<Projection, number>();
      targets.set(m, Math.max(targets.get(m) ?? 0, w.rank));
      this.loraTargetsOf.set(slot, targets);
      const { inDim, outDim } = projectionDims(this.spec, m);
      // A [rank, in] -> pool [in, r] (zero-padded ranks are exact); B [out, rank] -> pool [r, out].
      const aBase = row * inDim * r;
      for (let k = 0; k < w.rank; k++)
        for (let i = 0; i < inDim; i++) pool.a[aBase + i * r + k] = w.a[k * inDim + i]!;
      const bBase = row * r * outDim;
      for (let o = 0; o < outDim; o++)
        for (let k = 0; k < w.rank; k++) pool.b[bBase + k * outDim + o] = w.b[o * w.rank + k]!;
    }
  }

  private writeBottleneck(row: number, l: number, weights: SequenceAdapterWeights) {
    const D = this.spec.hiddenSize;
    const size = this.capacity.maxBottleneckSize;
    for (const [p, pool] of this.bottleneck) {
      const w = weights.bottleneck?.get(moduleKey(l, p));
      if (!w) continue;
      for (let k = 0; k < w.size; k++) {
        for (let i = 0; i < D; i++) pool.down[(row * D + i) * size + k] = w.down[k * D + i]!;
        pool.downBias[row * size + k] = w.downBias[k]!;
        for (let o = 0; o < D; o++) pool.up[(row * size + k) * D + o] = w.up[o * w.size + k]!;
      }
      pool.upBias.set(w.upBias, row * D);
    }
  }

  clearSlot(kind: PoolKind, slot: number): void {
    const L = this.spec.numLayers;
    const span = (perRow: number) => [slot * L * perRow, (slot + 1) * L * perRow] as const;
    if (kind === "lora") {
      this.loraTargetsOf.delete(slot);
      this.bumpLoraVersion(slot);
      for (const [m, pool] of this.lora) {
        const { inDim, outDim } = projectionDims(this.spec, m);
        pool.a.fill(0, ...span(inDim * this.capacity.maxLoraRank));
        pool.b.fill(0, ...span(outDim * this.capacity.maxLoraRank));
      }
    } else if (kind === "ia3") {
      this.ia3SitesOf.delete(slot);
      for (const { site, width } of this.ia3Sites) this.ia3.get(site)?.fill(1, ...span(width));
    } else {
      const D = this.spec.hiddenSize;
      const size = this.capacity.maxBottleneckSize;
      for (const pool of this.bottleneck.values()) {
        pool.down.fill(0, ...span(D * size));
        pool.downBias.fill(0, ...span(size));
        pool.up.fill(0, ...span(size * D));
        pool.upBias.fill(0, ...span(D));
      }
    }
  }

  private bumpLoraVersion(slot: number): void {
    this.loraVersions.set(slot, (this.loraVersions.get(slot) ?? 0) + 1);
  }

  /** Rows currently holding per-row LoRA copies (memory accounting). */
  get loraRowsAllocated(): number {
    return this.loraRows.allocatedRows;
  }

  /**
   * The pool feeds a step changes from `defaults`: a kind no row uses keeps the identity. `loraSlots` and
   * `ia3Slots` are the step's rows' slots: a LoRA site none of their adapters targets keeps its rank-0 default,
   * and ia3_wide says whether one of their IA3 adapters scales a wide site (IA3_WIDE_SITES).
   */
  feeds(
    used: Record<PoolKind, boolean>,
    loraSlots: ArrayLike<bigint> = [],
    ia3Slots: ArrayLike<bigint> = [],
  ): Record<string, FeedValue> {
    const feeds: Record<string, FeedValue> = {};
    const D = this.spec.hiddenSize;
    if (!used.lora) this.loraRows.idleStep();
    if (used.lora && this.lora.size) {
      const targeted = new Set<Projection>();
      for (let i = 0; i < loraSlots.length; i++) {
        for (const m of this.loraTargetsOf.get(Number(loraSlots[i]))?.keys() ?? []) targeted.add(m);
      }
      const versionOf = (slot: number) => this.loraVersions.get(slot) ?? 0;
      for (const site of this.loraSites) {
        if (!site.parts.some((m) => targeted.has(m))) continue;
        // The rows hold the site's projections some resident adapter targets, at the largest rank any resident
        // adapter has on them, not --max-lora-rank: the pool's extra columns are zeros, and copying them would
        // cost memory and bandwidth for nothing.
        let rank = 0;
        const parts = site.parts.filter((m) => {
          let partRank = 0;
          for (const ranks of this.loraTargetsOf.values()) partRank = Math.max(partRank, ranks.get(m) ?? 0);
          rank = Math.max(rank, partRank);
          return partRank > 0;
        });
        this.loraRows.feeds(site, parts, rank, this.lora, loraSlots, versionOf, feeds);
      }
    }
    if (used.ia3 && this.ia3.size) {
      for (const { site, width } of this.ia3Sites)
        feeds[INPUT.ia3(site)] = f32(this.ia3.get(site)!, [this.rows(this.capacity.ia3Slots), width]);
      if (this.hasIa3Wide) {
        let wide = false;
        for (let i = 0; i < ia3Slots.length && !wide; i++)
          for (const site of this.ia3SitesOf.get(Number(ia3Slots[i])) ?? [])
            wide ||= IA3_WIDE_SITES.includes(site);
        if (wide) feeds[INPUT.ia3Wide] = IA3_WIDE;
      }
    }
    if (used.bottleneck && this.bottleneck.size) {
      const rows = this.rows(this.capacity.bottleneckSlots);
      const size = this.capacity.maxBottleneckSize;
      for (const [p, pool] of this.bottleneck) {
        feeds[INPUT.bottleneckDown(p)] = f32(pool.down, [rows, D, size]);
        feeds[INPUT.bottleneckDownBias(p)] = f32(pool.downBias, [rows, size]);
        feeds[INPUT.bottleneckUp(p)] = f32(pool.up, [rows, size, D]);
        feeds[INPUT.bottleneckUpBias(p)] = f32(pool.upBias, [rows, D]);
      }
    }
    return feeds;
  }
}
