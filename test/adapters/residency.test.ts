import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { AdapterResidency, type SlotWriter } from "../../src/adapters/residency.ts";
import type { AdapterPoolKind, SequenceAdapterWeights } from "../../src/model/contract.ts";

function recordingWriter() {
  const writes: string[] = [];
  const writer: SlotWriter = {
    async writeAdapterSlot(kind: AdapterPoolKind, slot: number, weights: SequenceAdapterWeights) {
      writes.push(`${kind}:${slot}:${weights.lora ? "lora" : "?"}`);
    },
    async clearAdapterSlot(kind: AdapterPoolKind, slot: number) {
      writes.push(`clear ${kind}:${slot}`);
    },
  };
  return { writer, writes };
}

const weights = () => ({ lora: new Map() });

describe("adapter residency", () => {
  test("assigns slots from 1, reuses a resident adapter, and evicts the least recently used idle one", async () => {
    const { writer, writes } = recordingWriter();
    const r = new AdapterResidency(writer, { lora: 2, ia3: 1, bottleneck: 1 });
    assert.equal(await r.acquire("lora", 1, "a", weights), 1);
    assert.equal(await r.acquire("lora", 2, "b", weights), 2);
    assert.deepEqual(r.table("lora"), ["(identity)", "a", "b"]);
    r.release("lora", 1);
    r.release("lora", 2);
    assert.equal(await r.acquire("lora", 1, "a", weights), 1, "resident: no reload");
    r.release("lora", 1);
    // b was used less recently than a: c takes b's slot.
    assert.equal(await r.acquire("lora", 3, "c", weights), 2);
    assert.deepEqual(r.table("lora"), ["(identity)", "a", "c"]);
    assert.equal(writes.filter((w) => w.startsWith("lora:")).length, 3);
  });

  test("never evicts a pinned adapter: a request waits for a slot instead of failing", async () => {
    const { writer } = recordingWriter();
    const r = new AdapterResidency(writer, { lora: 1, ia3: 1, bottleneck: 1 });
    await r.acquire("lora", 1, "a", weights);
    let got: number | null = null;
    const waiting = r.acquire("lora", 2, "b", weights).then((slot) => {
      got = slot;
    });
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(got, null, "b waits while a is pinned");
    assert.deepEqual(r.table("lora"), ["(identity)", "a"]);
    r.release("lora", 1);
    await waiting;
    assert.equal(got, 1);
    assert.deepEqual(r.table("lora"), ["(identity)", "b"]);
  });

  test("forget clears the slot of a freed version only when nothing pins it", async () => {
    const { writer, writes } = recordingWriter();
    const r = new AdapterResidency(writer, { lora: 2, ia3: 1, bottleneck: 1 });
    await r.acquire("lora", 7, "a", weights);
    r.forget(7);
    assert.deepEqual(r.table("lora"), ["(identity)", "a", null], "pinned: kept");
    r.release("lora", 7);
    r.forget(7);
    assert.deepEqual(r.table("lora"), ["(identity)", null, null]);
    assert.ok(writes.includes("clear lora:1"));
  });
});
