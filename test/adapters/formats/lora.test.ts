/** Tests for PEFT LoRA parsing: scale folding (plain, rsLoRA, patterns), layer selection, key variants, rejections. */
import assert from "node:assert/strict";
import { truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { loadLora, parseLora } from "../../../src/adapters/formats/lora.ts";
import { parsePeftConfig } from "../../../src/adapters/formats/peft-config.ts";
import { moduleKey, type Projection, projectionDims } from "../../../src/model/contract.ts";
import type { FloatTensor } from "../../../src/model/safetensors.ts";
import { assertRejects, halfSafetensors, safetensors, smallSpec, tempDir, tensor } from "./fixtures.ts";

const spec = smallSpec();
const FILE = "adapters/demo/adapter_model.safetensors";
const CONFIG = "adapters/demo/adapter_config.json";
const config = (extra: Record<string, unknown> = {}) =>
  parsePeftConfig(
    { peft_type: "LORA", r: 2, lora_alpha: 6, target_modules: ["q_proj", "v_proj"], ...extra },
    CONFIG,
  );

const prefixOf = (layer: number, p: Projection) =>
  `base_model.model.model.layers.${layer}.${p === "gate_proj" || p === "up_proj" || p === "down_proj" ? "mlp" : "self_attn"}.${p}`;

/** A and B for each (layer, projection, rank); optional key infix such as ".default". */
function loraTensors(modules: [number, Projection, number][], infix = ""): Record<string, FloatTensor> {
  const out: Record<string, FloatTensor> = {};
  for (const [layer, p, r] of modules) {
    const { inDim, outDim } = projectionDims(spec, p);
    out[`${prefixOf(layer, p)}.lora_A${infix}.weight`] = tensor([r, inDim], (i) => 0.01 * (i + 1) + layer);
    out[`${prefixOf(layer, p)}.lora_B${infix}.weight`] = tensor([outDim, r], (i) => 0.1 * (i - 3) + layer);
  }
  return out;
}

const qv = (r = 2): [number, Projection, number][] => [
  [0, "q_proj", r],
  [0, "v_proj", r],
  [1, "q_proj", r],
  [1, "v_proj", r],
];
const map = (t: Record<string, FloatTensor>) => new Map(Object.entries(t));

function assertScaled(b: Float32Array, source: FloatTensor, scale: number) {
  assert.equal(b.length, source.data.length);
  for (let i = 0; i < b.length; i++) assert.equal(b[i], Math.fround(source.data[i]! * scale));
}

describe("PEFT LoRA", () => {
  test("folds lora_alpha / r into B and keeps A as stored", () => {
    const t = loraTensors(qv());
    const lora = parseLora(map(t), FILE, config(), spec, 8);
    assert.equal(lora.rank, 2);
    assert.deepEqual([...lora.modules.keys()], ["0.q_proj", "0.v_proj", "1.q_proj", "1.v_proj"]);
    const m = lora.modules.get(moduleKey(1, "v_proj"))!;
    assert.equal(m.rank, 2);
    assert.deepEqual(m.a, t[`${prefixOf(1, "v_proj")}.lora_A.weight`]!.data);
    assertScaled(m.b, t[`${prefixOf(1, "v_proj")}.lora_B.weight`]!, 6 / 2);
  });

  test("uses lora_alpha / sqrt(r) with use_rslora", () => {
    const t = loraTensors(qv(4));
    const lora = parseLora(map(t), FILE, config({ r: 4, use_rslora: true }), spec, 8);
    assertScaled(
      lora.modules.get("0.q_proj")!.b,
      t[`${prefixOf(0, "q_proj")}.lora_B.weight`]!,
      6 / Math.sqrt(4),
    );
  });

  test("rank_pattern and alpha_pattern override r and alpha per module", () => {
    const t = loraTensors([
      [0, "q_proj", 2],
      [0, "v_proj", 4],
      [1, "q_proj", 2],
      [1, "v_proj", 2],
    ]);
    const c = config({
      rank_pattern: { "layers.0.self_attn.v_proj": 4 },
      alpha_pattern: { "model.layers.1.self_attn.q_proj": 10 },
    });
    const lora = parseLora(map(t), FILE, c, spec, 8);
    assert.equal(lora.rank, 4);
    assert.equal(lora.modules.get("0.v_proj")!.rank, 4);
    assertScaled(lora.modules.get("0.v_proj")!.b, t[`${prefixOf(0, "v_proj")}.lora_B.weight`]!, 6 / 4);
    assertScaled(lora.modules.get("1.q_proj")!.b, t[`${prefixOf(1, "q_proj")}.lora_B.weight`]!, 10 / 2);
    assertScaled(lora.modules.get("1.v_proj")!.b, t[`${prefixOf(1, "v_proj")}.lora_B.weight`]!, 6 / 2);
  });

  test("layers_to_transform restricts the layers", () => {
    const t = loraTensors([
      [1, "q_proj", 2],
      [1, "v_proj", 2],
    ]);
    const lora = parseLora(map(t), FILE, config({ layers_to_transform: [1] }), spec, 8);
    assert.deepEqual([...lora.modules.keys()], ["1.q_proj", "1.v_proj"]);
  });

  test("fan_in_fan_out is ignored for Linear targets, as PEFT does: same arrays", () => {
    const t = loraTensors(qv());
    const plain = parseLora(map(t), FILE, config(), spec, 8);
    const flagged = parseLora(map(t), FILE, config({ fan_in_fan_out: true }), spec, 8);
    for (const [k, m] of plain.modules) {
      assert.deepEqual(flagged.modules.get(k)!.a, m.a);
      assert.deepEqual(flagged.modules.get(k)!.b, m.b);
    }
  });

  test("accepts keys that still carry the adapter name, and MLP targets", () => {
    const modules: [number, Projection, number][] = [
      [0, "gate_proj", 2],
      [1, "gate_proj", 2],
      [0, "down_proj", 2],
      [1, "down_proj", 2],
    ];
    const lora = parseLora(
      map(loraTensors(modules, ".default")),
      FILE,
      config({ target_modules: ["gate_proj", "down_proj"] }),
      spec,
      8,
    );
    assert.deepEqual([...lora.modules.keys()], ["0.gate_proj", "0.down_proj", "1.gate_proj", "1.down_proj"]);
    assert.equal(lora.modules.get("1.down_proj")!.a.length, 2 * 12);
  });

  test("reads F16 and BF16 files, widened to float32", () => {
    const dir = tempDir();
    const t = loraTensors(qv());
    for (const dtype of ["F16", "BF16"] as const) {
      const file = join(dir, `${dtype}.safetensors`);
      writeFileSync(file, halfSafetensors(t, dtype));
      const m = loadLora(file, config(), spec, 8).modules.get("0.q_proj")!;
      const a = t[`${prefixOf(0, "q_proj")}.lora_A.weight`]!.data;
      for (let i = 0; i < a.length; i++) assert.ok(Math.abs(m.a[i]! - a[i]!) < 0.02 * Math.abs(a[i]!) + 1e-3);
    }
  });

  describe("rejects", () => {
    const good = () => map(loraTensors(qv()));
    test("DoRA", () =>
      assertRejects(
        () => parseLora(good(), FILE, config({ use_dora: true }), spec, 8),
        "adapter_incompatible",
        /adapter_config\.json/,
        /use_dora/,
      ));
    test("modules_to_save", () =>
      assertRejects(
        () => parseLora(good(), FILE, config({ modules_to_save: ["lm_head"] }), spec, 8),
        "adapter_incompatible",
        /modules_to_save \["lm_head"\]/,
      ));
    test("trained biases", () =>
      assertRejects(
        () => parseLora(good(), FILE, config({ bias: "all" }), spec, 8),
        "adapter_incompatible",
        /bias = "all"/,
      ));
    for (const target of ["c_attn", "lm_head", "embed_tokens"]) {
      test(`a target the base lacks or taskmux cannot adapt: ${target}`, () =>
        assertRejects(
          () => parseLora(good(), FILE, config({ target_modules: ["q_proj", target] }), spec, 8),
          "adapter_incompatible",
          new RegExp(`"${target}"`),
        ));
    }
    test("a tensor for lm_head under a regex target", () => {
      const t = { ...loraTensors(qv()), "base_model.model.lm_head.lora_A.weight": tensor([2, 8]) };
      assertRejects(
        () => parseLora(map(t), FILE, config({ target_modules: ".*(q_proj|v_proj|lm_head)" }), spec, 8),
        "adapter_incompatible",
        /lm_head/,
        /cannot adapt/,
      );
    });
    test("an input width that does not match the base, naming both shapes", () => {
      const t = loraTensors(qv());
      t[`${prefixOf(0, "q_proj")}.lora_A.weight`] = tensor([2, 16]);
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_incompatible",
        /adapter_model\.safetensors/,
        /q_proj\.lora_A\.weight has shape \[2, 16\], expected \[2, 8\]/,
      );
    });
    test("an output width that does not match the base", () => {
      const t = loraTensors(qv());
      t[`${prefixOf(1, "v_proj")}.lora_B.weight`] = tensor([8, 2]);
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_incompatible",
        /shape \[8, 2\], expected \[4, 2\]/,
      );
    });
    test("A and B of different ranks", () => {
      const t = loraTensors(qv());
      t[`${prefixOf(0, "q_proj")}.lora_B.weight`] = tensor([8, 3]);
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_load_failed",
        /lora_A \[2, 8\] and lora_B \[8, 3\] disagree/,
      );
    });
    test("a rank other than the config's r", () =>
      assertRejects(
        () => parseLora(map(loraTensors(qv(4))), FILE, config(), spec, 8),
        "adapter_load_failed",
        /rank 4 .* r = 2/,
      ));
    test("a rank above the server's maximum", () =>
      assertRejects(
        () => parseLora(map(loraTensors(qv(4))), FILE, config({ r: 4 }), spec, 2),
        "adapter_incompatible",
        /rank 4, above .* maximum LoRA rank 2/,
      ));
    test("non-finite weights", () => {
      const t = loraTensors(qv());
      t[`${prefixOf(1, "q_proj")}.lora_B.weight`]!.data[5] = Number.NaN;
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_load_failed",
        /q_proj\.lora_B\.weight holds a non-finite value \(NaN\)/,
      );
    });
    test("a missing lora_B", () => {
      const t = loraTensors(qv());
      delete t[`${prefixOf(1, "v_proj")}.lora_B.weight`];
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_load_failed",
        /layers\.1\.self_attn\.v_proj is targeted but its lora_B weight is missing/,
      );
    });
    test("a targeted module with no weights at all", () => {
      const t = loraTensors(qv());
      delete t[`${prefixOf(1, "v_proj")}.lora_A.weight`];
      delete t[`${prefixOf(1, "v_proj")}.lora_B.weight`];
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_load_failed",
        /lora_A and lora_B weight is missing/,
      );
    });
    test("weights for a module the config does not select", () =>
      assertRejects(
        () => parseLora(good(), FILE, config({ target_modules: ["q_proj"] }), spec, 8),
        "adapter_load_failed",
        /v_proj, which adapter_config\.json .* does not select/,
      ));
    test("a layer the base does not have", () => {
      const t = { ...loraTensors(qv()), ...loraTensors([[5, "q_proj", 2]]) };
      assertRejects(
        () => parseLora(map(t), FILE, config(), spec, 8),
        "adapter_incompatible",
        /layer 5, but the base model has 2 layers/,
      );
    });
    test("a DoRA magnitude tensor", () => {
      const t = { ...loraTensors(qv()), [`${prefixOf(0, "q_proj")}.lora_magnitude_vector`]: tensor([8]) };
      assertRejects(() => parseLora(map(t), FILE, config(), spec, 8), "adapter_incompatible", /DoRA/);
    });
    test("a truncated file, naming it", () => {
      const file = join(tempDir(), "adapter_model.safetensors");
      writeFileSync(file, safetensors(loraTensors(qv())));
      truncateSync(file, 200);
      assertRejects(
        () => loadLora(file, config(), spec, 8),
        "adapter_load_failed",
        new RegExp(`${file.replaceAll(".", "\\.")}: truncated`),
      );
    });
  });
});
