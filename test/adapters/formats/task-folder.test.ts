/** Tests for task folders: recognising each layout by its files, combining parts, and the cross-file rejections. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { loadTaskFolder } from "../../../src/adapters/formats/task-folder.ts";
import { type Projection, projectionDims } from "../../../src/model/contract.ts";
import type { FloatTensor } from "../../../src/model/safetensors.ts";
import { assertRejects, safetensors, smallSpec, tempDir, tensor, writeFolder } from "./fixtures.ts";

const spec = smallSpec();
const limits = { maxLoraRank: 8, maxBottleneckSize: 16 };
const root = tempDir();

function loraWeights(): Uint8Array {
  const t: Record<string, FloatTensor> = {};
  for (const layer of [0, 1]) {
    for (const p of ["q_proj", "v_proj"] as Projection[]) {
      const { inDim, outDim } = projectionDims(spec, p);
      t[`base_model.model.model.layers.${layer}.self_attn.${p}.lora_A.weight`] = tensor([2, inDim]);
      t[`base_model.model.model.layers.${layer}.self_attn.${p}.lora_B.weight`] = tensor([outDim, 2]);
    }
  }
  return safetensors(t);
}
const loraConfig = {
  peft_type: "LORA",
  r: 2,
  lora_alpha: 4,
  target_modules: ["q_proj", "v_proj"],
  task_type: "CAUSAL_LM",
};
const softPrompt = (n: number) => safetensors({ prompt_embeddings: tensor([n, 8]) });
const templated = (extra: Record<string, unknown> = {}) => ({
  prompt_template: "<|VIRTUAL_PROMPT_0|>Q: {prompt}\n<|VIRTUAL_PROMPT_1|>A:",
  virtual_token_splits: [3, 1],
  ...extra,
});

describe("task folders", () => {
  test("task.json + a LoRA adapter + soft_prompt.safetensors: every part, files and size", () => {
    const dir = writeFolder(root, "lora-plus", {
      "task.json": templated(),
      "adapter_config.json": loraConfig,
      "adapter_model.safetensors": loraWeights(),
      "soft_prompt.safetensors": softPrompt(4),
      "README.md": "ignored",
    });
    const parts = loadTaskFolder(dir, spec, limits);
    assert.equal(parts.name, "lora-plus");
    assert.equal(parts.peftType, "LORA");
    assert.equal(parts.lora!.rank, 2);
    assert.equal(parts.lora!.modules.size, 4);
    assert.equal(parts.softPrompt!.numVirtualTokens, 4);
    assert.equal(parts.softPrompt!.source, "prompt_tuning");
    assert.deepEqual(parts.definition!.virtualTokenSplits, [3, 1]);
    assert.deepEqual([...parts.files].sort(), [
      "adapter_config.json",
      "adapter_model.safetensors",
      "soft_prompt.safetensors",
      "task.json",
    ]);
    assert.ok(parts.sizeBytes > 1000);
  });

  test("a PEFT PROMPT_TUNING folder without task.json is a soft prompt alone", () => {
    const dir = writeFolder(root, "pt", {
      "adapter_config.json": { peft_type: "PROMPT_TUNING", num_virtual_tokens: 5, token_dim: 8 },
      "adapter_model.safetensors": softPrompt(5),
    });
    const parts = loadTaskFolder(dir, spec, limits);
    assert.equal(parts.definition, undefined);
    assert.equal(parts.softPrompt!.numVirtualTokens, 5);
    assert.equal(parts.peftType, "PROMPT_TUNING");
  });

  test("a single placeholder takes every virtual token", () => {
    const dir = writeFolder(root, "one-group", {
      "task.json": { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}" },
      "adapter_config.json": { peft_type: "PROMPT_TUNING", num_virtual_tokens: 5 },
      "adapter_model.safetensors": softPrompt(5),
    });
    assert.deepEqual(loadTaskFolder(dir, spec, limits).definition!.virtualTokenSplits, [5]);
  });

  test("a task.json alone is a prompt-engineering task", () => {
    const dir = writeFolder(root, "polite.v2", {
      "task.json": { system_prompt: "Be polite.", chain_of_thought: "Think first." },
    });
    const parts = loadTaskFolder(dir, spec, limits);
    assert.equal(parts.peftType, null);
    assert.equal(parts.definition!.systemPrompt, "Be polite.");
    assert.deepEqual(parts.files, ["task.json"]);
  });

  test("IA3, bottleneck and prefix folders load their part", () => {
    const ia3 = writeFolder(root, "ia3", {
      "adapter_config.json": { peft_type: "IA3", target_modules: ["k_proj"], feedforward_modules: [] },
      "adapter_model.safetensors": safetensors({
        "base_model.model.model.layers.0.self_attn.k_proj.ia3_l": tensor([4, 1]),
        "base_model.model.model.layers.1.self_attn.k_proj.ia3_l": tensor([4, 1]),
      }),
    });
    assert.equal(loadTaskFolder(ia3, spec, limits).ia3!.size, 2);
    const bnTensors: Record<string, FloatTensor> = {};
    for (const l of [0, 1]) {
      bnTensors[`layers.${l}.mlp.adapter_down.weight`] = tensor([2, 8]);
      bnTensors[`layers.${l}.mlp.adapter_down.bias`] = tensor([2]);
      bnTensors[`layers.${l}.mlp.adapter_up.weight`] = tensor([8, 2]);
      bnTensors[`layers.${l}.mlp.adapter_up.bias`] = tensor([8]);
    }
    const bn = writeFolder(root, "bn", {
      "adapter_config.json": {
        peft_type: "BOTTLENECK",
        adapter_size: 2,
        non_linearity: "silu",
        placement: ["mlp"],
      },
      "adapter_model.safetensors": safetensors(bnTensors),
    });
    const bnParts = loadTaskFolder(bn, spec, limits);
    assert.equal(bnParts.bottleneck!.size, 2);
    assert.equal(bnParts.peftType, "BOTTLENECK");
    const prefix = writeFolder(root, "prefix", {
      "adapter_config.json": { peft_type: "PREFIX_TUNING", num_virtual_tokens: 2 },
      "adapter_model.safetensors": safetensors({ prompt_embeddings: tensor([2, 2 * 2 * 1 * 4]) }),
    });
    assert.equal(loadTaskFolder(prefix, spec, limits).prefix!.length, 2);
  });

  describe("rejects", () => {
    for (const name of [".hidden", "with space", "x".repeat(65)]) {
      test(`the folder name ${JSON.stringify(name.slice(0, 12))}`, () =>
        assertRejects(
          () => loadTaskFolder(writeFolder(root, name, { "task.json": {} }), spec, limits),
          "adapter_load_failed",
          /task folder name/,
        ));
    }
    test("a folder with no task files", () =>
      assertRejects(
        () => loadTaskFolder(writeFolder(root, "empty", { "notes.txt": "x" }), spec, limits),
        "adapter_load_failed",
        /not a task folder/,
      ));
    test("adapter_config.json without weights", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "no-weights", { "adapter_config.json": loraConfig }),
            spec,
            limits,
          ),
        "adapter_load_failed",
        /adapter_model\.safetensors is missing/,
      ));
    test("pickled weights", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "pickle", { "adapter_config.json": loraConfig, "adapter_model.bin": "x" }),
            spec,
            limits,
          ),
        "adapter_incompatible",
        /adapter_model\.bin: PyTorch pickle/,
      ));
    test("an unsupported peft_type", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "loha", {
              "adapter_config.json": { peft_type: "LOHA" },
              "adapter_model.safetensors": loraWeights(),
            }),
            spec,
            limits,
          ),
        "adapter_incompatible",
        /peft_type "LOHA"/,
      ));
    test("malformed task.json", () =>
      assertRejects(
        () => loadTaskFolder(writeFolder(root, "bad-json", { "task.json": "{ nope" }), spec, limits),
        "adapter_load_failed",
        /task\.json: is not valid JSON/,
      ));
    test("placeholders without a soft prompt", () =>
      assertRejects(
        () => loadTaskFolder(writeFolder(root, "no-sp", { "task.json": templated() }), spec, limits),
        "adapter_load_failed",
        /task\.json: .* no soft prompt/,
      ));
    test("a soft prompt the template does not place", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "unplaced", {
              "task.json": { prompt_template: "Q: {prompt}" },
              "soft_prompt.safetensors": softPrompt(4),
            }),
            spec,
            limits,
          ),
        "adapter_load_failed",
        /4 virtual tokens, but prompt_template has no <\|VIRTUAL_PROMPT_0\|>/,
      ));
    test("splits that do not sum to the soft prompt's rows", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "bad-splits", {
              "task.json": templated(),
              "soft_prompt.safetensors": softPrompt(6),
            }),
            spec,
            limits,
          ),
        "adapter_load_failed",
        /\[3,1\] sum to 4, but the soft prompt has 6 rows/,
      ));
    test("two soft prompts", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "two-sp", {
              "adapter_config.json": { peft_type: "PROMPT_TUNING", num_virtual_tokens: 4 },
              "adapter_model.safetensors": softPrompt(4),
              "soft_prompt.safetensors": softPrompt(4),
            }),
            spec,
            limits,
          ),
        "adapter_load_failed",
        /soft_prompt\.safetensors: .* one soft prompt/,
      ));
    test("a LoRA rank above the server's maximum", () =>
      assertRejects(
        () =>
          loadTaskFolder(
            writeFolder(root, "big-rank", {
              "adapter_config.json": loraConfig,
              "adapter_model.safetensors": loraWeights(),
            }),
            spec,
            { ...limits, maxLoraRank: 1 },
          ),
        "adapter_incompatible",
        /maximum LoRA rank 1/,
      ));
    test("an adapter kind the graph was built without (--peft), while soft prompts still load", () => {
      const lora = writeFolder(root, "lora-off", {
        "adapter_config.json": loraConfig,
        "adapter_model.safetensors": loraWeights(),
      });
      assertRejects(
        () => loadTaskFolder(lora, spec, { ...limits, peftKinds: ["ia3", "bottleneck"] }),
        "adapter_incompatible",
        /lora-off[/\\]adapter_config\.json: LORA adapters need the lora paths/,
        /--peft ia3,bottleneck/,
      );
      assertRejects(
        () => loadTaskFolder(lora, spec, { ...limits, peftKinds: [] }),
        "adapter_incompatible",
        /--peft none\); start it with --peft including lora/,
      );
      assert.equal(loadTaskFolder(lora, spec, { ...limits, peftKinds: ["lora"] }).lora!.rank, 2);
      const prompt = writeFolder(root, "prompt-on", {
        "adapter_config.json": { peft_type: "PROMPT_TUNING", num_virtual_tokens: 3, token_dim: 8 },
        "adapter_model.safetensors": softPrompt(3),
      });
      assert.equal(
        loadTaskFolder(prompt, spec, { ...limits, peftKinds: [] }).softPrompt!.numVirtualTokens,
        3,
      );
    });
  });
});
