import assert from "node:assert/strict";
import { test } from "node:test";
import {
  FULL_PEFT_LAYOUT,
  INPUT,
  ia3Dim,
  ia3Sites,
  isSharedInputSite,
  loraSites,
  moduleKey,
  projectionDims,
  SITES,
  siteOfProjection,
} from "../../src/model/contract.ts";
import { LORA_ROWS_IDLE_STEPS } from "../../src/model/lora-rows.ts";
import { PeftPools } from "../../src/model/peft-pools.ts";
import { makeRandomModel } from "../helpers/random-model.ts";

const { spec } = makeRandomModel({}, 1);
const CAPACITY = { loraSlots: 3, maxLoraRank: 4, ia3Slots: 2, bottleneckSlots: 2, maxBottleneckSize: 4 };

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
type Feeds = ReturnType<PeftPools["feeds"]>;
/** What a step is fed: the pools' defaults, overridden by the step's own feeds. */
const fed = (pools: PeftPools, slots: BigInt64Array): Feeds => ({
  ...pools.defaults,
  ...pools.feeds(on, slots),
});
type Target = (typeof FULL_PEFT_LAYOUT.loraTargets)[number];

const siteOf = siteOfProjection;
const columnOf = (m: Target) =>
  loraSites(spec, FULL_PEFT_LAYOUT.loraTargets)
    .find((s) => s.site === siteOf(m))!
    .columns.get(m)!;

/**
 * Which part of its site's rows projection m is fed as in `feeds` (-1: none), read from the site's lora_columns:
 * every block of m's output columns must come from the same part's product, at that block's own place. Columns
 * no part holds point at part 0's product (B is zero there), so m counts as a part only if its B columns are not
 * all zero (the adapters here never have an all-zero B).
 */
const partOf = (feeds: Feeds, m: Target): number => {
  const site = siteOf(m);
  if (!isSharedInputSite(site)) return 0;
  const layout = loraSites(spec, FULL_PEFT_LAYOUT.loraTargets).find((s) => s.site === site)!;
  const columns = feeds[INPUT.loraColumns(site)]!;
  const blocks = layout.width / layout.block;
  assert.deepEqual(columns.dims, [blocks], `${site}: a column index per block`);
  const parts = feeds[INPUT.loraA(0, site)]!.dims[1]!;
  const { outDim } = projectionDims(spec, m);
  const own = new Set<number>();
  for (let q = columnOf(m) / layout.block; q < (columnOf(m) + outDim) / layout.block; q++) {
    const index = Number(columns.data[q]);
    assert.equal(index % blocks, q, `${site}: block ${q} is taken from its own place`);
    own.add(Math.floor(index / blocks));
  }
  assert.equal(own.size, 1, `${site}: ${m}'s columns all come from one part`);
  const j = [...own][0]!;
  assert.ok(j < parts, `${site}: ${m} points at one of the ${parts} parts`);
  const b = feeds[INPUT.loraB(0, site)]!;
  const [rows, , rank, width] = b.dims as number[];
  for (let row = 0; row < rows!; row++)
    for (let k = 0; k < rank!; k++) {
      const at = (row * rank! + k) * width! + columnOf(m);
      if ((b.data as Float32Array).subarray(at, at + outDim).some((v) => v !== 0)) return j;
    }
  return -1;
};

/**
 * The rank projection m is fed at in `feeds` (every layer alike; 0 when its site is fed at rank 0 or m is not
 * one of the site's parts), checking the feeds' shapes on the way.
 */
const rankOf = (feeds: Feeds, m: Target, batch: number) => {
  const site = siteOf(m);
  const shared = isSharedInputSite(site);
  const ranks = new Set<number>();
  for (let l = 0; l < spec.numLayers; l++) {
    const a = feeds[INPUT.loraA(l, site)]!;
    const b = feeds[INPUT.loraB(l, site)]!;
    const rank = a.dims[a.dims.length - 1]!;
    assert.equal(a.dims.length, shared ? 4 : 3, `${site}: A's rank`);
    assert.equal(
      a.dims[0],
      rank === 0 ? 1 : batch,
      `${site}: A has a row per batch row (or broadcasts at rank 0)`,
    );
    assert.equal(b.dims[0], a.dims[0], `${site}: B rows match A's`);
    assert.equal(b.dims[b.dims.length - 2], rank, `${site}: A and B ranks agree`);
    if (shared) {
      assert.equal(b.dims[1], 1, `${site}: one B a row, shared by its parts`);
    }
    for (const [what, x] of [
      ["A", a],
      ["B", b],
    ] as const) {
      assert.equal(
        x.data.length,
        x.dims.reduce((p, q) => p * q, 1),
        `${site}: ${what} data matches its dims`,
      );
    }
    ranks.add(rank);
  }
  assert.equal(ranks.size, 1, `${site}: one rank in every layer`);
  const rank = [...ranks][0]!;
  return rank > 0 && partOf(feeds, m) >= 0 ? rank : 0;
};

/** Row `row`'s A for projection m in layer l, as fed ([in][r]). */
const rowA = (feeds: Feeds, l: number, m: Target, row: number) => {
  const a = feeds[INPUT.loraA(l, siteOf(m))]!;
  const size = a.dims[a.dims.length - 2]! * a.dims[a.dims.length - 1]!;
  const parts = a.dims.length === 4 ? a.dims[1]! : 1;
  const at = (row * parts + partOf(feeds, m)) * size;
  return Array.from(a.data.subarray(at, at + size) as Float32Array);
};

/** Row `row`'s B for projection m in layer l, as fed: its own columns of the site's width ([r][out]). */
const rowB = (feeds: Feeds, l: number, m: Target, row: number) => {
  const b = feeds[INPUT.loraB(l, siteOf(m))]!;
  const [rank, width] = b.dims.slice(-2) as [number, number];
  const { outDim } = projectionDims(spec, m);
  const out: number[] = [];
  for (let k = 0; k < rank; k++) {
    const at = (row * rank + k) * width + columnOf(m);
    out.push(...(b.data.subarray(at, at + outDim) as Float32Array));
  }
  return out;
};

test("a LoRA projection none of the step's adapters targets is fed at rank 0, the others at the adapters' rank", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj", "v_proj"]));
  pools.writeSlot("lora", 2, lora(["down_proj"]));

  const onlyFirst = fed(pools, BigInt64Array.of(1n, 0n, 1n));
  for (const m of FULL_PEFT_LAYOUT.loraTargets) {
    assert.equal(rankOf(onlyFirst, m, 3), ["q_proj", "v_proj"].includes(m) ? 2 : 0, `slot 1 step: ${m}`);
  }
  const both = fed(pools, BigInt64Array.of(2n, 1n));
  for (const m of FULL_PEFT_LAYOUT.loraTargets) {
    assert.equal(
      rankOf(both, m, 2),
      ["q_proj", "v_proj", "down_proj"].includes(m) ? 2 : 0,
      `slots 1+2: ${m}`,
    );
  }
});

test("each part of a shared-input site gets its own A block and B columns; other columns stay zero", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  const valueA = (m: Target, l: number, k: number, i: number) =>
    (SITES.qkv as readonly Target[]).indexOf(m) + l / 10 + k / 100 + i / 1e4;
  const valueB = (m: Target, l: number, o: number, k: number) =>
    -(1 + (SITES.qkv as readonly Target[]).indexOf(m) + l / 10 + o / 1e4 + k / 100);
  const adapter = (targets: Target[], rank: number) => {
    const weights = new Map();
    for (let l = 0; l < spec.numLayers; l++)
      for (const m of targets) {
        const { inDim, outDim } = projectionDims(spec, m);
        const a = new Float32Array(rank * inDim).map((_, x) =>
          valueA(m, l, Math.floor(x / inDim), x % inDim),
        );
        const b = new Float32Array(outDim * rank).map((_, x) => valueB(m, l, Math.floor(x / rank), x % rank));
        weights.set(moduleKey(l, m), { rank, a, b });
      }
    return { lora: weights };
  };
  const rank = 2;
  pools.writeSlot("lora", 1, adapter(["q_proj", "v_proj"], rank));
  const before = fed(pools, BigInt64Array.of(1n, 0n));
  assert.equal(partOf(before, "k_proj"), -1, "k is no part while no resident adapter targets it");
  assert.equal(before[INPUT.loraA(0, "qkv")]!.dims[1], 2, "two parts: q and v");
  assert.equal(rankOf(before, "v_proj", 2), rank);
  // A k adapter arriving (hot-load) adds a part at the same rank: the rows are laid out again.
  pools.writeSlot("lora", 2, adapter(["k_proj"], rank));
  const feeds = fed(pools, BigInt64Array.of(2n, 1n, 0n));
  const slotOfRow = [2, 1, 0];
  for (const m of ["q_proj", "k_proj", "v_proj"] as Target[]) {
    assert.equal(rankOf(feeds, m, 3), rank, `${m}: the adapters' rank`);
    const { inDim, outDim } = projectionDims(spec, m);
    for (let l = 0; l < spec.numLayers; l++)
      slotOfRow.forEach((slot, row) => {
        const owns = (slot === 1 && m !== "k_proj") || (slot === 2 && m === "k_proj");
        const a = rowA(feeds, l, m, row);
        const b = rowB(feeds, l, m, row);
        for (let i = 0; i < inDim; i++)
          for (let k = 0; k < rank; k++) {
            const want = owns ? valueA(m, l, k, i) : 0;
            assert.ok(Math.abs(a[i * rank + k]! - want) < 1e-6, `A ${m} layer ${l} row ${row} [${i}, ${k}]`);
          }
        for (let k = 0; k < rank; k++)
          for (let o = 0; o < outDim; o++) {
            const want = owns ? valueB(m, l, o, k) : 0;
            assert.ok(
              Math.abs(b[k * outDim + o]! - want) < 1e-6,
              `B ${m} layer ${l} row ${row} [${k}, ${o}]`,
            );
          }
      });
  }
  assert.equal(rankOf(feeds, "o_proj", 3), 0, "o_proj: no adapter targets it");
});

test("clearing a slot forgets its targets; rewriting it with other targets takes the new ones", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj"]));
  pools.clearSlot("lora", 1);
  assert.equal(rankOf(fed(pools, BigInt64Array.of(1n)), "q_proj", 1), 0, "cleared slot targets nothing");
  pools.writeSlot("lora", 1, lora(["v_proj"]));
  const feeds = fed(pools, BigInt64Array.of(1n));
  assert.equal(rankOf(feeds, "q_proj", 1), 0, "old target gone");
  assert.equal(rankOf(feeds, "v_proj", 1), 2, "new target fed at the adapter's rank");
});

test("each row is fed its own slot's weights, through row moves, slot rewrites, rank changes and batch growth", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  const { inDim, outDim } = projectionDims(spec, "q_proj");
  /** A's entry for rank index k in layer l of slot s: (s, l, k)-specific. */
  const value = (s: number, l: number, k: number, scale: number) => scale * (s * 10 + l + 1) * (k + 1);
  const adapter = (s: number, { scale = 1, rank = 2 } = {}) => {
    const weights = new Map();
    for (let l = 0; l < spec.numLayers; l++) {
      const a = new Float32Array(rank * inDim);
      for (let k = 0; k < rank; k++) a.fill(value(s, l, k, scale), k * inDim, (k + 1) * inDim);
      weights.set(moduleKey(l, "q_proj"), { rank, a, b: new Float32Array(outDim * rank).fill(1) });
    }
    return { lora: weights };
  };
  /** What a row holding slot s (0: no adapter) must be fed in layer l: [in][width], columns past its rank 0. */
  const expectedA = (s: number, l: number, width: number, { scale = 1, rank = 2 } = {}) =>
    Array.from({ length: inDim * width }, (_, i) => {
      const k = i % width;
      return s > 0 && k < rank ? value(s, l, k, scale) : 0;
    });
  const check = (
    feeds: Feeds,
    slots: number[],
    width: number,
    what: string,
    shapes: Record<number, { scale?: number; rank?: number }> = {},
  ) => {
    assert.equal(rankOf(feeds, "q_proj", slots.length), width, `${what}: fed rank`);
    for (let l = 0; l < spec.numLayers; l++) {
      slots.forEach((s, row) => {
        assert.deepEqual(
          rowA(feeds, l, "q_proj", row),
          expectedA(s, l, width, shapes[s]),
          `${what}: layer ${l} row ${row}`,
        );
      });
    }
  };
  for (const s of [1, 2, 3]) pools.writeSlot("lora", s, adapter(s));
  check(fed(pools, BigInt64Array.of(1n, 2n)), [1, 2], 2, "first step (rank 2 of the pool's 4)");
  check(fed(pools, BigInt64Array.of(2n, 0n, 1n)), [2, 0, 1], 2, "rows moved, one without adapter");
  pools.writeSlot("lora", 2, adapter(2, { scale: 3 }));
  check(fed(pools, BigInt64Array.of(2n, 0n, 1n)), [2, 0, 1], 2, "slot 2 rewritten in place", {
    2: { scale: 3 },
  });
  pools.writeSlot("lora", 3, adapter(3, { rank: 3 }));
  check(fed(pools, BigInt64Array.of(2n, 3n, 1n)), [2, 3, 1], 3, "a rank-3 adapter widens every row", {
    2: { scale: 3 },
    3: { rank: 3 },
  });
  pools.clearSlot("lora", 3);
  check(fed(pools, BigInt64Array.of(1n, 2n)), [1, 2], 2, "back to rank 2 once it is gone", {
    2: { scale: 3 },
  });
  const many = Array.from({ length: 11 }, (_, i) => (i % 2) + 1);
  check(fed(pools, BigInt64Array.from(many, BigInt)), many, 2, "batch grown past a row block", {
    2: { scale: 3 },
  });
  assert.ok(pools.loraRowsAllocated >= 11, "rows grew to the batch");
});

test("a step feeds only what it changes; the defaults hold every pool input at its identity", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj"]));
  const none = { lora: false, ia3: false, bottleneck: false };
  assert.deepEqual(Object.keys(pools.feeds(none, BigInt64Array.of(0n))), [], "a base step changes nothing");
  const loraStep = Object.keys(pools.feeds(on, BigInt64Array.of(1n)));
  assert.equal(
    loraStep.length,
    2 * spec.numLayers + 1,
    "a q-only LoRA step feeds the qkv site's A and B in every layer, and its mask",
  );
  for (const name of loraStep) assert.ok(name in pools.defaults, `${name} is a graph input with a default`);
  const ia3Names = ia3Sites(spec, FULL_PEFT_LAYOUT.ia3Targets).map(({ site }) => INPUT.ia3(site));
  assert.equal(ia3Names.length, 4, "qkv, o_proj, gate_up and down_proj");
  for (const name of ia3Names) {
    assert.ok(
      pools.defaults[name]!.data.every((v) => v === 1),
      `${name} defaults to all-ones scales`,
    );
  }
});

test("the row copies are freed after a long run of steps without LoRA, and remade on the next LoRA step", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  pools.writeSlot("lora", 1, lora(["q_proj"]));
  const before = fed(pools, BigInt64Array.of(1n, 1n));
  const none = { lora: false, ia3: false, bottleneck: false };
  for (let i = 0; i < LORA_ROWS_IDLE_STEPS - 1; i++) pools.feeds(none, BigInt64Array.of(0n));
  assert.ok(pools.loraRowsAllocated > 0, "kept through idle steps short of the limit");
  fed(pools, BigInt64Array.of(1n));
  for (let i = 0; i < LORA_ROWS_IDLE_STEPS - 1; i++) pools.feeds(none, BigInt64Array.of(0n));
  assert.ok(pools.loraRowsAllocated > 0, "a LoRA step restarts the count");
  pools.feeds(none, BigInt64Array.of(0n));
  assert.equal(pools.loraRowsAllocated, 0, "freed after the limit");
  const after = fed(pools, BigInt64Array.of(1n, 1n));
  for (let l = 0; l < spec.numLayers; l++) {
    for (const row of [0, 1]) {
      assert.deepEqual(
        rowA(after, l, "q_proj", row),
        rowA(before, l, "q_proj", row),
        `layer ${l} row ${row}`,
      );
    }
  }
});

test("IA3 vectors land in their site's pool at their projection's columns; the rest stay ones", () => {
  const layout = {
    loraTargets: [],
    ia3Targets: ["k_proj", "v_proj", "up_proj", "down_proj"] as Target[],
    bottleneck: false,
  };
  const pools = new PeftPools(spec, layout, CAPACITY);
  const sites = ia3Sites(spec, layout.ia3Targets);
  assert.deepEqual(
    sites.map((s) => s.site),
    ["qkv", "gate_up", "down_proj"],
    "o_proj has no target, so no pool",
  );
  const value = (l: number, m: Target) => 2 + l + layout.ia3Targets.indexOf(m) / 10;
  const ia3 = new Map<string, Float32Array>();
  for (let l = 0; l < spec.numLayers; l++)
    for (const m of ["k_proj", "up_proj", "down_proj"] as const)
      ia3.set(moduleKey(l, m), new Float32Array(ia3Dim(spec, m)).fill(value(l, m)));
  pools.writeSlot("ia3", 2, { ia3 });
  const feeds = pools.feeds({ lora: false, ia3: true, bottleneck: false });
  const L = spec.numLayers;
  for (const { site, width } of sites) {
    const pool = feeds[INPUT.ia3(site)]!;
    assert.deepEqual(pool.dims, [(CAPACITY.ia3Slots + 1) * L, width], `${site} pool shape`);
    const data = pool.data as Float32Array;
    for (let slot = 0; slot <= CAPACITY.ia3Slots; slot++) {
      for (let l = 0; l < L; l++) {
        const row = data.subarray((slot * L + l) * width, (slot * L + l + 1) * width);
        let column = 0;
        for (const m of {
          qkv: ["q_proj", "k_proj", "v_proj"],
          gate_up: ["gate_proj", "up_proj"],
          down_proj: ["down_proj"],
        }[site as "qkv"] as Target[]) {
          const dim = ia3Dim(spec, m);
          const expected = slot === 2 && ia3.has(moduleKey(l, m)) ? value(l, m) : 1;
          const part = row.subarray(column, column + dim);
          assert.ok(
            part.every((v) => Math.abs(v - expected) < 1e-6),
            `slot ${slot} layer ${l} ${m} holds ${expected}`,
          );
          column += dim;
        }
        assert.equal(column, width, `${site} width`);
      }
    }
  }
  pools.clearSlot("ia3", 2);
  const cleared = pools.feeds({ lora: false, ia3: true, bottleneck: false });
  for (const { site } of sites)
    assert.ok(
      (cleared[INPUT.ia3(site)]!.data as Float32Array).every((v) => v === 1),
      `${site} cleared to ones`,
    );
});

test("ia3_wide is set exactly when a row's IA3 adapter scales o, gate or up", () => {
  const pools = new PeftPools(spec, FULL_PEFT_LAYOUT, CAPACITY);
  const vectors = (targets: Target[]) => {
    const ia3 = new Map<string, Float32Array>();
    for (let l = 0; l < spec.numLayers; l++)
      for (const m of targets) ia3.set(moduleKey(l, m), new Float32Array(ia3Dim(spec, m)).fill(1.5));
    return { ia3 };
  };
  pools.writeSlot("ia3", 1, vectors(["k_proj", "v_proj", "down_proj"]));
  pools.writeSlot("ia3", 2, vectors(["up_proj"]));
  const wide = (slots: bigint[]) => {
    const feeds = {
      ...pools.defaults,
      ...pools.feeds({ lora: false, ia3: true, bottleneck: false }, [], slots),
    };
    return feeds[INPUT.ia3Wide]!.data[0] === 1;
  };
  assert.equal(pools.defaults[INPUT.ia3Wide]!.data[0], 0, "the default says no");
  assert.equal(wide([1n, 0n, 1n]), false, "k, v and down only");
  assert.equal(wide([1n, 2n]), true, "a row scaling up");
  pools.clearSlot("ia3", 2);
  pools.writeSlot("ia3", 2, vectors(["q_proj"]));
  assert.equal(wide([2n]), false, "a rewritten slot forgets its old sites");
});
