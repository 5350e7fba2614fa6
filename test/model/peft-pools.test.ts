import assert from "node:assert/strict";
import { test } from "node:test";
import { FULL_PEFT_LAYOUT, INPUT, moduleKey, projectionDims } from "../../src/model/contract.ts";
import { PeftPools } from "../../src/model/peft-pools.ts";
import { makeRandomModel } from "../helpers/random-model.ts";

const { spec } = makeRandomModel({}, 1);
const CAPACITY = { loraSlots: 3, maxLoraRank: 4, ia3Slots: 2, bottleneckSlots: 2, maxBottleneckSize: 4 };
const rows = (CAPACITY.loraSlots + 1) * spec.numLayers;

/** A rank-2 LoRA with weights on `targets` in every layer. */
function lora(targets: ("q_proj" | "v_proj" | "down_proj")[]) {
  const weights = new Map();
  for (let l = 0; l < spec.numLayers; l++) {
    for (const m of targets) {
      const { inDim, outDim } = projectionDims(spec, m);
      weights.set(moduleKey(l, m), {
        rank: 2,
        a: new Float32Array(2 * inDim).fill(0.5),
        b: new Float32Array(outDim * 2).fill(0.25),
      });
    }
  }
  return { lora: weights };
}

const on = { lora: true, ia3: false, bottleneck: false };
const rankOf = (feeds: ReturnType<PeftPools["feeds"]>, m: (typeof FULL_PEFT_LAYOUT.loraTargets)[number]) => {
  const a = feeds[INPUT.loraA(m)]!;
  const b = feeds[INPUT.loraB(m)]!;
  assert.equal(a.dims[0], rows, `${m}: A keeps every slot's rows`);
  assert.equal(b.dims[0], rows, `${m}: B keeps every slot's rows`);
  assert.equal(a.dims[2], b.dims[1], `${m}: A and B ranks agree`);
  assert.equal(
    a.data.length,
    a.dims.reduce((x, y) => x * y, 1),
    `${m}: A data matches its dims`,
  );
  return a.dims[2];
};

test("a LoRA projection none of the step's adapters targets is fed at rank 0, the others at full rank", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj", "v_proj"]));
  pools.writeSlot("lora", 2, lora(["down_proj"]));

  const onlyFirst = pools.feeds(on, BigInt64Array.of(1n, 0n, 1n));
  for (const m of FULL_PEFT_LAYOUT.loraTargets) {
    assert.equal(rankOf(onlyFirst, m), ["q_proj", "v_proj"].includes(m) ? 4 : 0, `slot 1 step: ${m}`);
  }
  const both = pools.feeds(on, BigInt64Array.of(2n, 1n));
  for (const m of FULL_PEFT_LAYOUT.loraTargets) {
    assert.equal(rankOf(both, m), ["q_proj", "v_proj", "down_proj"].includes(m) ? 4 : 0, `slots 1+2: ${m}`);
  }
});

test("clearing a slot forgets its targets; rewriting it with other targets takes the new ones", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj"]));
  pools.clearSlot("lora", 1);
  assert.equal(rankOf(pools.feeds(on, BigInt64Array.of(1n)), "q_proj"), 0, "cleared slot targets nothing");
  pools.writeSlot("lora", 1, lora(["v_proj"]));
  const feeds = pools.feeds(on, BigInt64Array.of(1n));
  assert.equal(rankOf(feeds, "q_proj"), 0, "old target gone");
  assert.equal(rankOf(feeds, "v_proj"), 4, "new target fed");
});
