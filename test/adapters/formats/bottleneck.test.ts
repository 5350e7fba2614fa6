/** Tests for our bottleneck adapter layout: config validation, per-layer/placement weights, rejections. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { parseBottleneck, parseBottleneckConfig } from "../../../src/adapters/formats/bottleneck.ts";
import type { FloatTensor } from "../../../src/model/safetensors.ts";
import { assertRejects, smallSpec, tensor } from "./fixtures.ts";

const spec = smallSpec();
const CONFIG = "adapters/bn/adapter_config.json";
const FILE = "adapters/bn/adapter_model.safetensors";
const config = (extra: Record<string, unknown> = {}, max = 16) =>
  parseBottleneckConfig(
    { peft_type: "BOTTLENECK", adapter_size: 3, non_linearity: "silu", ...extra },
    CONFIG,
    max,
  );

function bnTensors(places: string[] = ["attn", "mlp"], n = 3, d = 8): Record<string, FloatTensor> {
  const out: Record<string, FloatTensor> = {};
  for (const layer of [0, 1]) {
    for (const p of places) {
      out[`layers.${layer}.${p}.adapter_down.weight`] = tensor([n, d], (i) => 0.1 * i + layer);
      out[`layers.${layer}.${p}.adapter_down.bias`] = tensor([n], (i) => -0.1 * i);
      out[`layers.${layer}.${p}.adapter_up.weight`] = tensor([d, n], (i) => 0.05 * i);
      out[`layers.${layer}.${p}.adapter_up.bias`] = tensor([d], (i) => 0.01 * i);
    }
  }
  return out;
}
const map = (t: Record<string, FloatTensor>) => new Map(Object.entries(t));

describe("bottleneck adapter", () => {
  test("placement defaults to both blocks; every layer gets down/up weights and biases", () => {
    const t = bnTensors();
    const bn = parseBottleneck(map(t), FILE, config(), spec);
    assert.equal(bn.size, 3);
    assert.deepEqual([...bn.modules.keys()], ["0.attn", "0.mlp", "1.attn", "1.mlp"]);
    const m = bn.modules.get("1.mlp")!;
    assert.equal(m.size, 3);
    assert.deepEqual(m.down, t["layers.1.mlp.adapter_down.weight"]!.data);
    assert.deepEqual(m.downBias, t["layers.1.mlp.adapter_down.bias"]!.data);
    assert.deepEqual(m.up, t["layers.1.mlp.adapter_up.weight"]!.data);
    assert.deepEqual(m.upBias, t["layers.1.mlp.adapter_up.bias"]!.data);
  });

  test("placement [mlp] reads only the MLP adapters", () => {
    const bn = parseBottleneck(map(bnTensors(["mlp"])), FILE, config({ placement: ["mlp"] }), spec);
    assert.deepEqual([...bn.modules.keys()], ["0.mlp", "1.mlp"]);
  });

  describe("rejects", () => {
    test("a non-linearity other than silu", () =>
      assertRejects(
        () => config({ non_linearity: "relu" }),
        "adapter_incompatible",
        /adapter_config\.json/,
        /non_linearity "relu"/,
      ));
    test("a size above the server's maximum", () =>
      assertRejects(
        () => config({ adapter_size: 32 }),
        "adapter_incompatible",
        /adapter_size 32 is above .* maximum bottleneck size 16/,
      ));
    test("an unknown placement", () =>
      assertRejects(() => config({ placement: ["ffn"] }), "adapter_load_failed", /placement\.0/));
    test("a hidden size other than the base's, naming both shapes", () =>
      assertRejects(
        () => parseBottleneck(map(bnTensors(["attn", "mlp"], 3, 16)), FILE, config(), spec),
        "adapter_incompatible",
        /adapter_down\.weight has shape \[3, 16\], expected \[3, 8\]/,
      ));
    test("a size other than adapter_size", () =>
      assertRejects(
        () => parseBottleneck(map(bnTensors(["attn", "mlp"], 4)), FILE, config(), spec),
        "adapter_load_failed",
        /shape \[4, 8\], expected \[3, 8\]/,
      ));
    test("non-finite weights", () => {
      const t = bnTensors();
      t["layers.0.attn.adapter_up.bias"]!.data[0] = Number.NaN;
      assertRejects(
        () => parseBottleneck(map(t), FILE, config(), spec),
        "adapter_load_failed",
        /layers\.0\.attn\.adapter_up\.bias holds a non-finite value/,
      );
    });
    test("a missing tensor", () => {
      const t = bnTensors();
      delete t["layers.1.attn.adapter_down.bias"];
      assertRejects(
        () => parseBottleneck(map(t), FILE, config(), spec),
        "adapter_load_failed",
        /layers\.1\.attn\.adapter_down\.bias is missing/,
      );
    });
    test("tensors for a placement the config leaves out", () =>
      assertRejects(
        () => parseBottleneck(map(bnTensors()), FILE, config({ placement: ["attn"] }), spec),
        "adapter_load_failed",
        /unexpected tensor layers\.0\.mlp/,
      ));
    test("a layer the base does not have", () => {
      const t = { ...bnTensors(), "layers.7.attn.adapter_up.bias": tensor([8]) };
      assertRejects(
        () => parseBottleneck(map(t), FILE, config(), spec),
        "adapter_incompatible",
        /layer 7, but the base model has 2 layers/,
      );
    });
  });
});
