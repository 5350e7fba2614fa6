/**
 * @module adapters/residency — which task version sits in which pool slot, per PEFT kind. Slot 0 is the
 * identity and never assigned. A slot is pinned while a sequence uses it; idle resident adapters are evicted
 * least recently used (lru-cache over the unpinned ones only), and a request that finds every slot pinned
 * waits for one instead of failing (vLLM's active/registered tiers).
 */
import { LRUCache } from "lru-cache";
import { createLogger } from "../log.ts";
import type { AdapterPoolKind, SequenceAdapterWeights } from "../model/contract.ts";

const log = createLogger({ module: "residency" });

export interface SlotWriter {
  writeAdapterSlot(kind: AdapterPoolKind, slot: number, weights: SequenceAdapterWeights): Promise<void>;
  clearAdapterSlot(kind: AdapterPoolKind, slot: number): Promise<void>;
}

interface Occupant {
  refId: number;
  name: string;
  pins: number;
  /** Resolves once the weights are written into the slot. */
  ready: Promise<void>;
}

class KindPool {
  /** slots[0] is the identity and stays null */
  readonly slots: (Occupant | null)[];
  private readonly bySlotRef = new Map<number, number>();
  /** Unpinned resident adapters, least recently used first out (refId -> slot). */
  private readonly idle: LRUCache<number, number>;
  private readonly waiters: (() => void)[] = [];

  constructor(
    readonly kind: AdapterPoolKind,
    readonly capacity: number,
    private readonly writer: SlotWriter,
  ) {
    this.slots = new Array(capacity + 1).fill(null);
    this.idle = new LRUCache<number, number>({ max: Math.max(1, capacity) });
  }

  async acquire(refId: number, name: string, weights: () => SequenceAdapterWeights): Promise<number> {
    for (;;) {
      const existing = this.bySlotRef.get(refId);
      if (existing !== undefined) {
        const occupant = this.slots[existing]!;
        occupant.pins++;
        this.idle.delete(refId);
        await occupant.ready;
        return existing;
      }
      const slot = this.freeSlot();
      if (slot !== null) {
        const occupant: Occupant = { refId, name, pins: 1, ready: Promise.resolve() };
        this.slots[slot] = occupant;
        this.bySlotRef.set(refId, slot);
        occupant.ready = this.writer.writeAdapterSlot(this.kind, slot, weights());
        log.info("adapter resident", { kind: this.kind, task: name, slot });
        try {
          await occupant.ready;
        } catch (error) {
          this.vacate(slot);
          throw error;
        }
        return slot;
      }
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  private freeSlot(): number | null {
    for (let s = 1; s < this.slots.length; s++) if (this.slots[s] === null) return s;
    const victim = this.idle.pop();
    if (victim === undefined) return null;
    const occupant = this.slots[victim]!;
    log.info("adapter evicted", { kind: this.kind, task: occupant.name, slot: victim });
    this.bySlotRef.delete(occupant.refId);
    this.slots[victim] = null;
    return victim;
  }

  release(refId: number): void {
    const slot = this.bySlotRef.get(refId);
    if (slot === undefined) return;
    const occupant = this.slots[slot]!;
    occupant.pins--;
    if (occupant.pins <= 0) {
      this.idle.set(refId, slot);
      this.waiters.shift()?.();
    }
  }

  /** Free the slot of a version that no longer exists (unloaded or replaced, and unpinned). */
  forget(refId: number): void {
    const slot = this.bySlotRef.get(refId);
    if (slot === undefined || this.slots[slot]!.pins > 0) return;
    this.vacate(slot);
    void this.writer.clearAdapterSlot(this.kind, slot);
  }

  private vacate(slot: number): void {
    const occupant = this.slots[slot];
    if (!occupant) return;
    this.bySlotRef.delete(occupant.refId);
    this.idle.delete(occupant.refId);
    this.slots[slot] = null;
    this.waiters.shift()?.();
  }

  residentNames(): string[] {
    return this.slots.filter((o): o is Occupant => o !== null).map((o) => o.name);
  }
}

export class AdapterResidency {
  private readonly pools: Record<AdapterPoolKind, KindPool>;

  constructor(writer: SlotWriter, capacity: Record<AdapterPoolKind, number>) {
    this.pools = {
      lora: new KindPool("lora", capacity.lora, writer),
      ia3: new KindPool("ia3", capacity.ia3, writer),
      bottleneck: new KindPool("bottleneck", capacity.bottleneck, writer),
    };
  }

  /** Pin (loading if needed) a slot for this task version's weights of one kind; waits while all are pinned. */
  acquire(
    kind: AdapterPoolKind,
    refId: number,
    name: string,
    weights: () => SequenceAdapterWeights,
  ): Promise<number> {
    return this.pools[kind].acquire(refId, name, weights);
  }

  release(kind: AdapterPoolKind, refId: number): void {
    this.pools[kind].release(refId);
  }

  forget(refId: number): void {
    for (const pool of Object.values(this.pools)) pool.forget(refId);
  }

  /** slot -> task name (null = free; index 0 is the identity), for tests and /v1/tasks. */
  table(kind: AdapterPoolKind): (string | null)[] {
    return this.pools[kind].slots.map((o, i) => (i === 0 ? "(identity)" : (o?.name ?? null)));
  }

  residentNames(): string[] {
    return [...new Set(Object.values(this.pools).flatMap((p) => p.residentNames()))];
  }

  capacity(kind: AdapterPoolKind): number {
    return this.pools[kind].capacity;
  }
}
