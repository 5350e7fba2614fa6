/** Tests for adapter_config.json reading and PEFT's module-selection rules (target_modules, layers, patterns). */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { type PeftConfig, parsePeftConfig } from "../../../src/adapters/formats/peft-config.ts";
import {
  isTargeted,
  patternValue,
  projectionModuleName,
  targetedModules,
} from "../../../src/adapters/formats/peft-targets.ts";
import { assertRejects, smallSpec } from "./fixtures.ts";

const FILE = "adapters/x/adapter_config.json";
const cfg = (extra: Record<string, unknown>): PeftConfig =>
  parsePeftConfig({ peft_type: "LORA", ...extra }, FILE);
const q0 = projectionModuleName(0, "q_proj");
const q1 = projectionModuleName(1, "q_proj");
const k1 = projectionModuleName(1, "k_proj");

describe("adapter_config.json", () => {
  test("reads PEFT's fields with PEFT's defaults and keeps unknown keys", () => {
    const c = cfg({
      target_modules: ["q_proj"],
      layers_to_transform: 1,
      layers_pattern: "layers",
      revision: null,
    });
    assert.equal(c.peftType, "LORA");
    assert.equal(c.r, 8);
    assert.equal(c.loraAlpha, 8);
    assert.equal(c.useRslora, false);
    assert.deepEqual(c.layersToTransform, [1]);
    assert.deepEqual(c.layersPattern, ["layers"]);
    assert.equal(c.bias, "none");
    assert.equal(c.raw.revision, null);
  });

  test("accepts every supported peft_type", () => {
    for (const t of ["LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"]) {
      assert.equal(parsePeftConfig({ peft_type: t }, FILE).peftType, t);
    }
  });

  test("rejects an unsupported peft_type, naming it", () => {
    assertRejects(
      () => cfg({ peft_type: "LOHA" }),
      "adapter_incompatible",
      /adapter_config\.json/,
      /peft_type "LOHA" is not supported/,
    );
  });

  test("rejects a malformed field", () => {
    assertRejects(() => cfg({ r: -4 }), "adapter_load_failed", /adapter_config\.json: r:/);
    assertRejects(
      () => cfg({ target_modules: "(" }),
      "adapter_load_failed",
      /target_modules: "\(" is not a valid regular expression/,
    );
  });
});

describe("PEFT target selection", () => {
  test("list entries match the full name or a dot-suffix, not a bare substring", () => {
    const c = cfg({ target_modules: ["q_proj", "self_attn.k_proj"] });
    assert.equal(isTargeted(c, q0), true);
    assert.equal(isTargeted(c, k1), true);
    assert.equal(isTargeted(c, projectionModuleName(0, "v_proj")), false);
    assert.equal(isTargeted(cfg({ target_modules: ["_proj"] }), q0), false);
    assert.equal(isTargeted(cfg({ target_modules: [q1] }), q1), true);
  });

  test("a string target is a regex that must match the whole module name", () => {
    const c = cfg({ target_modules: ".*\\.(q_proj|v_proj)" });
    assert.equal(isTargeted(c, q0), true);
    assert.equal(isTargeted(c, k1), false);
    assert.equal(isTargeted(cfg({ target_modules: "q_proj" }), q0), false, "re.fullmatch, not search");
    assert.equal(isTargeted(cfg({ target_modules: "model\\.layers\\.1\\..*proj" }), q0), false);
    assert.equal(isTargeted(cfg({ target_modules: "model\\.layers\\.1\\..*proj" }), q1), true);
  });

  test("all-linear selects every projection", () => {
    assert.equal(targetedModules(cfg({ target_modules: "all-linear" }), smallSpec()).length, 14);
  });

  test("layers_to_transform restricts list targets, with the default or a named layers_pattern", () => {
    const spec = smallSpec();
    const names = (c: PeftConfig) => targetedModules(c, spec).map((m) => m.name);
    assert.deepEqual(names(cfg({ target_modules: ["q_proj"], layers_to_transform: [1] })), [q1]);
    assert.deepEqual(
      names(cfg({ target_modules: ["q_proj"], layers_to_transform: 0, layers_pattern: ["layers"] })),
      [q0],
    );
    assert.deepEqual(
      names(cfg({ target_modules: ["q_proj"], layers_to_transform: [0], layers_pattern: "h" })),
      [],
    );
    assert.deepEqual(
      names(cfg({ target_modules: ".*q_proj", layers_to_transform: [1] })),
      [q0, q1],
      "ignored for regex targets",
    );
  });

  test("exclude_modules removes matches", () => {
    const c = cfg({ target_modules: ["q_proj", "k_proj"], exclude_modules: ["layers.1.self_attn.k_proj"] });
    assert.deepEqual(
      targetedModules(c, smallSpec()).map((m) => m.name),
      [q0, projectionModuleName(0, "k_proj"), q1],
    );
  });

  test("rank_pattern keys match a dot-suffix (or regex), first key in file order wins", () => {
    const patterns = { "layers.1.self_attn.q_proj": 4, q_proj: 2, "(k|v)_proj": 16 };
    assert.equal(patternValue(patterns, q1, 8), 4);
    assert.equal(patternValue(patterns, q0, 8), 2);
    assert.equal(patternValue(patterns, k1, 8), 16);
    assert.equal(patternValue({ proj: 3 }, q0, 8), 8, "proj is not a dot-suffix of ...q_proj");
  });
});
