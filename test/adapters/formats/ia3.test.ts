/** Tests for PEFT IA3 parsing: output scales for attention targets, input scale for feed-forward down_proj, rejections. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { isFeedforward, parseIa3 } from "../../../src/adapters/formats/ia3.ts";
import { parsePeftConfig } from "../../../src/adapters/formats/peft-config.ts";
import type { FloatTensor } from "../../../src/model/safetensors.ts";
import { assertRejects, smallSpec, tensor } from "./fixtures.ts";

const spec = smallSpec();
const FILE = "adapters/ia3/adapter_model.safetensors";
const config = (extra: Record<string, unknown> = {}) =>
  parsePeftConfig(
    {
      peft_type: "IA3",
      target_modules: ["k_proj", "v_proj", "down_proj"],
      feedforward_modules: ["down_proj"],
      ...extra,
    },
    "adapters/ia3/adapter_config.json",
  );

/** PEFT's shapes: k/v [out=4, 1], down [1, in=12]. */
function ia3Tensors(suffix = ""): Record<string, FloatTensor> {
  const out: Record<string, FloatTensor> = {};
  for (const layer of [0, 1]) {
    const base = `base_model.model.model.layers.${layer}`;
    out[`${base}.self_attn.k_proj.ia3_l${suffix}`] = tensor([4, 1], (i) => 1 + 0.1 * i + layer);
    out[`${base}.self_attn.v_proj.ia3_l${suffix}`] = tensor([4, 1], (i) => 0.5 + 0.1 * i);
    out[`${base}.mlp.down_proj.ia3_l${suffix}`] = tensor([1, 12], (i) => 2 - 0.1 * i);
  }
  return out;
}
const map = (t: Record<string, FloatTensor>) => new Map(Object.entries(t));

describe("PEFT IA3", () => {
  test("reads output scales for k/v and the input scale for down_proj", () => {
    const t = ia3Tensors();
    const ia3 = parseIa3(map(t), FILE, config(), spec);
    assert.deepEqual(
      [...ia3.keys()],
      ["0.k_proj", "0.v_proj", "0.down_proj", "1.k_proj", "1.v_proj", "1.down_proj"],
    );
    assert.deepEqual(ia3.get("1.k_proj"), t["base_model.model.model.layers.1.self_attn.k_proj.ia3_l"]!.data);
    assert.equal(ia3.get("0.down_proj")!.length, 12);
    assert.deepEqual(ia3.get("0.down_proj"), t["base_model.model.model.layers.0.mlp.down_proj.ia3_l"]!.data);
  });

  for (const suffix of [".weight", ".default", ".default.weight"]) {
    test(`accepts keys ending ia3_l${suffix}`, () => {
      assert.equal(parseIa3(map(ia3Tensors(suffix)), FILE, config(), spec).size, 6);
    });
  }

  test("feed-forward matching follows PEFT: regex full match, list entries by plain suffix", () => {
    assert.equal(isFeedforward({ feedforwardModules: ["down_proj"] }, "model.layers.0.mlp.down_proj"), true);
    assert.equal(isFeedforward({ feedforwardModules: ".*down_proj" }, "model.layers.0.mlp.down_proj"), true);
    assert.equal(isFeedforward({ feedforwardModules: "down_proj" }, "model.layers.0.mlp.down_proj"), false);
    assert.equal(isFeedforward({ feedforwardModules: null }, "model.layers.0.mlp.down_proj"), false);
  });

  describe("rejects", () => {
    test("down_proj not in feedforward_modules (an output scale the graph does not carry)", () =>
      assertRejects(
        () => parseIa3(map(ia3Tensors()), FILE, config({ feedforward_modules: [] }), spec),
        "adapter_incompatible",
        /down_proj is not in feedforward_modules/,
        /input only/,
      ));
    test("up_proj in feedforward_modules (an input scale the graph does not carry)", () =>
      assertRejects(
        () =>
          parseIa3(
            map(ia3Tensors()),
            FILE,
            config({ target_modules: ["k_proj", "up_proj"], feedforward_modules: ["up_proj"] }),
            spec,
          ),
        "adapter_incompatible",
        /up_proj is in feedforward_modules/,
      ));
    test("feedforward_modules outside target_modules", () =>
      assertRejects(
        () =>
          parseIa3(map(ia3Tensors()), FILE, config({ feedforward_modules: ["down_proj", "up_proj"] }), spec),
        "adapter_load_failed",
        /"up_proj" is not in target_modules/,
      ));
    test("a vector of the wrong shape, naming both shapes", () => {
      const t = ia3Tensors();
      t["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] = tensor([12, 1]);
      assertRejects(
        () => parseIa3(map(t), FILE, config(), spec),
        "adapter_incompatible",
        /down_proj\.ia3_l has shape \[12, 1\], expected \[1, 12\]/,
      );
    });
    test("non-finite scales", () => {
      const t = ia3Tensors();
      t["base_model.model.model.layers.1.self_attn.v_proj.ia3_l"]!.data[2] = Number.POSITIVE_INFINITY;
      assertRejects(
        () => parseIa3(map(t), FILE, config(), spec),
        "adapter_load_failed",
        /v_proj\.ia3_l holds a non-finite value \(Infinity\)/,
      );
    });
    test("a missing vector", () => {
      const t = ia3Tensors();
      delete t["base_model.model.model.layers.1.self_attn.k_proj.ia3_l"];
      assertRejects(
        () => parseIa3(map(t), FILE, config(), spec),
        "adapter_load_failed",
        /layers\.1\.self_attn\.k_proj is targeted but its ia3_l vector is missing/,
      );
    });
    test("a target the base lacks", () =>
      assertRejects(
        () =>
          parseIa3(
            map(ia3Tensors()),
            FILE,
            config({ target_modules: ["k_proj", "v_proj", "down_proj", "fc1"] }),
            spec,
          ),
        "adapter_incompatible",
        /"fc1"/,
      ));
    test("a tensor that is not an ia3_l vector", () => {
      const t = {
        ...ia3Tensors(),
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": tensor([2, 8]),
      };
      assertRejects(
        () => parseIa3(map(t), FILE, config(), spec),
        "adapter_load_failed",
        /unexpected tensor .*lora_A/,
      );
    });
  });
});
