/**
 * @module scripts/make-examples — CLI: `node --import tsx scripts/make-examples.ts --model models/default
 * [--out .] [--seed 0]` writes small, seeded example tasks for a base model into `<out>/prompt-tables/` and
 * `<out>/adapters/`, in the on-disk formats src/adapters/formats/ reads (each folder written as
 * `.tmp-<name>/` and renamed into place). The weights are random but large enough that outputs visibly change.
 */
import { existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { inspectCheckpoint } from "../src/model/checkpoint.ts";
import { type Projection, projectionDims } from "../src/model/contract.ts";
import { makeRng, type Rng } from "../src/model/maker/prng.ts";
import type { ModelSpec } from "../src/model/model-spec.ts";
import { serializeSafetensors } from "../src/model/safetensors.ts";

type Tensors = Record<string, { shape: number[]; data: Float32Array }>;
type Files = Record<string, Tensors | Record<string, unknown>>;

/** Write a task folder's files into `dir` (created); returns the bytes written. */
export function writeTaskFiles(dir: string, files: Files): number {
  mkdirSync(dir, { recursive: true });
  let bytes = 0;
  for (const [file, content] of Object.entries(files)) {
    const data = file.endsWith(".safetensors")
      ? serializeSafetensors(content as Tensors)
      : `${JSON.stringify(content, null, 2)}\n`;
    writeFileSync(join(dir, file), data);
    bytes += data.length;
  }
  return bytes;
}

/** Write `root/name/` atomically: fill `root/.tmp-name/`, then rename it over the old folder. */
export function publish(root: string, name: string, files: Files): string {
  mkdirSync(root, { recursive: true });
  const tmp = join(root, `.tmp-${name}`);
  const dest = join(root, name);
  rmSync(tmp, { recursive: true, force: true });
  writeTaskFiles(tmp, files);
  rmSync(dest, { recursive: true, force: true });
  renameSync(tmp, dest);
  return dest;
}

const normals = (rng: Rng, shape: number[], std: number, mean = 0) => ({
  shape,
  data: rng.normals(
    shape.reduce((a, b) => a * b, 1),
    std,
    mean,
  ),
});

/** The fields PEFT writes in every adapter_config.json, so the examples look like what users bring. */
const peftCommon = (spec: ModelSpec, modelDir: string) => ({
  base_model_name_or_path: modelDir,
  inference_mode: true,
  revision: null,
  task_type: "CAUSAL_LM",
  num_layers: spec.numLayers,
  token_dim: spec.hiddenSize,
});

function summarize(spec: ModelSpec, rng: Rng, modelDir: string): Files {
  const n = 8;
  return {
    "task.json": {
      description:
        "One-sentence summaries: prompt tuning (8 virtual tokens) inside a template with few-shot examples.",
      prompt_template: "<|VIRTUAL_PROMPT_0|>Passage: {passage}\nOne-sentence summary:",
      fields: ["passage"],
      query_field: "passage",
      system_prompt: "You summarize passages in one short sentence.",
      few_shot: [
        {
          input: { passage: "The library will close early on Friday because of the staff training day." },
          output: " The library closes early on Friday.",
        },
        {
          input: { passage: "Rain is expected all weekend, so the market moves indoors to the town hall." },
          output: " The weekend market moves indoors.",
        },
      ],
      defaults: { temperature: 0.7, max_tokens: 48, stop: ["\n\n"] },
      truncate_field: "passage",
    },
    ...promptTuningTask(spec, rng, modelDir, n),
  };
}

/** A plain PEFT PROMPT_TUNING folder (no task.json): n virtual tokens before the prompt, as PEFT serves it. */
export function promptTuningTask(spec: ModelSpec, rng: Rng, modelDir: string, n = 8): Files {
  return {
    "adapter_config.json": {
      ...peftCommon(spec, modelDir),
      peft_type: "PROMPT_TUNING",
      num_virtual_tokens: n,
      num_transformer_submodules: 1,
      num_attention_heads: spec.numHeads,
      prompt_tuning_init: "RANDOM",
    },
    "adapter_model.safetensors": { prompt_embeddings: normals(rng, [n, spec.hiddenSize], 0.7) },
  };
}

const polite = (): Files => ({
  "task.json": {
    description:
      "Prompt engineering only: a system prompt, a template and a chain-of-thought instruction; no weights.",
    prompt_template: "Customer message: {prompt}\nPolite reply:",
    system_prompt: "You are a courteous support agent. Always thank the customer.",
    chain_of_thought: "First acknowledge how the customer feels, then answer in two sentences.",
    defaults: { temperature: 0.8, top_p: 0.95, max_tokens: 64 },
  },
});

/** A PEFT P_TUNING prompt encoder (MLP) checkpoint, under the names PEFT's PromptEncoder gives its weights. */
function ptuneMlp(spec: ModelSpec, rng: Rng, modelDir: string): Files {
  const n = 10;
  const d = spec.hiddenSize;
  const h = 64;
  const pre = "prompt_encoder.default.";
  const tensors: Tensors = {
    [`${pre}embedding.weight`]: normals(rng, [n, d], 1),
    [`${pre}mlp_head.0.weight`]: normals(rng, [h, d], 1 / Math.sqrt(d)),
    [`${pre}mlp_head.0.bias`]: normals(rng, [h], 0.1),
    [`${pre}mlp_head.2.weight`]: normals(rng, [h, h], Math.sqrt(2 / h)),
    [`${pre}mlp_head.2.bias`]: normals(rng, [h], 0.1),
    // He-style init: each ReLU layer keeps the scale, so the rows come out with std ~0.7-1.
    [`${pre}mlp_head.4.weight`]: normals(rng, [d, h], 1 / Math.sqrt(h)),
    [`${pre}mlp_head.4.bias`]: normals(rng, [d], 0.1),
  };
  return {
    "adapter_config.json": {
      ...peftCommon(spec, modelDir),
      peft_type: "P_TUNING",
      num_virtual_tokens: n,
      num_transformer_submodules: 1,
      num_attention_heads: spec.numHeads,
      encoder_reparameterization_type: "MLP",
      encoder_hidden_size: h,
      encoder_num_layers: 2,
      encoder_dropout: 0,
    },
    "adapter_model.safetensors": tensors,
  };
}

const modulePath = (layer: number, p: Projection) =>
  `base_model.model.model.layers.${layer}.${p === "gate_proj" || p === "up_proj" || p === "down_proj" ? "mlp" : "self_attn"}.${p}`;

/** A PEFT LORA folder (rank r on `targets` of every layer), seeded. */
export function loraTask(
  spec: ModelSpec,
  rng: Rng,
  modelDir: string,
  r = 8,
  targets: Projection[] = ["q_proj", "k_proj", "v_proj", "o_proj"],
): Files {
  const tensors: Tensors = {};
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const p of targets) {
      const { inDim, outDim } = projectionDims(spec, p);
      tensors[`${modulePath(layer, p)}.lora_A.weight`] = normals(rng, [r, inDim], 1 / Math.sqrt(inDim));
      tensors[`${modulePath(layer, p)}.lora_B.weight`] = normals(rng, [outDim, r], 0.1);
    }
  }
  return {
    "adapter_config.json": {
      base_model_name_or_path: modelDir,
      inference_mode: true,
      revision: null,
      task_type: "CAUSAL_LM",
      peft_type: "LORA",
      r,
      lora_alpha: 16,
      lora_dropout: 0,
      target_modules: targets,
      bias: "none",
      fan_in_fan_out: false,
      use_rslora: false,
      use_dora: false,
      init_lora_weights: true,
      layers_to_transform: null,
      layers_pattern: null,
      rank_pattern: {},
      alpha_pattern: {},
      modules_to_save: null,
    },
    "adapter_model.safetensors": tensors,
  };
}

/** A PEFT IA3 folder on k, v (outputs) and down (inputs), seeded. */
export function ia3Task(spec: ModelSpec, rng: Rng, modelDir: string): Files {
  const tensors: Tensors = {};
  const scale = (n: number, shape: number[]) => ({ shape, data: rng.normals(n, 0.5).map(Math.exp) });
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const p of ["k_proj", "v_proj"] as Projection[]) {
      const { outDim } = projectionDims(spec, p);
      tensors[`${modulePath(layer, p)}.ia3_l`] = scale(outDim, [outDim, 1]);
    }
    tensors[`${modulePath(layer, "down_proj")}.ia3_l`] = scale(spec.intermediateSize, [
      1,
      spec.intermediateSize,
    ]);
  }
  return {
    "adapter_config.json": {
      base_model_name_or_path: modelDir,
      inference_mode: true,
      revision: null,
      task_type: "CAUSAL_LM",
      peft_type: "IA3",
      target_modules: ["k_proj", "v_proj", "down_proj"],
      feedforward_modules: ["down_proj"],
      fan_in_fan_out: false,
      init_ia3_weights: true,
      modules_to_save: null,
    },
    "adapter_model.safetensors": tensors,
  };
}

function bottleneckDemo(spec: ModelSpec, rng: Rng): Files {
  const n = 16;
  const d = spec.hiddenSize;
  const tensors: Tensors = {};
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const place of ["attn", "mlp"]) {
      tensors[`layers.${layer}.${place}.adapter_down.weight`] = normals(rng, [n, d], 1);
      tensors[`layers.${layer}.${place}.adapter_down.bias`] = normals(rng, [n], 0.1);
      tensors[`layers.${layer}.${place}.adapter_up.weight`] = normals(rng, [d, n], 0.1);
      tensors[`layers.${layer}.${place}.adapter_up.bias`] = normals(rng, [d], 0.02);
    }
  }
  return {
    "adapter_config.json": {
      peft_type: "BOTTLENECK",
      adapter_size: n,
      non_linearity: "silu",
      placement: ["attn", "mlp"],
    },
    "adapter_model.safetensors": tensors,
  };
}

export interface MakeExamplesOptions {
  spec: ModelSpec;
  /** Folder that receives prompt-tables/ and adapters/. */
  out: string;
  seed: number;
  /** Written into base_model_name_or_path. */
  modelDir: string;
}

/** Write every example; returns the folders written. */
export function makeExamples({ spec, out, seed, modelDir }: MakeExamplesOptions): string[] {
  const rng = makeRng(seed);
  const tables = join(out, "prompt-tables");
  const adapters = join(out, "adapters");
  return [
    publish(tables, "summarize", summarize(spec, rng, modelDir)),
    publish(tables, "polite", polite()),
    publish(tables, "ptune-mlp", ptuneMlp(spec, rng, modelDir)),
    publish(adapters, "lora-demo", loraTask(spec, rng, modelDir)),
    publish(adapters, "ia3-demo", ia3Task(spec, rng, modelDir)),
    publish(adapters, "bottleneck-demo", bottleneckDemo(spec, rng)),
  ];
}

function main(): void {
  const { values } = parseArgs({
    options: {
      model: { type: "string", default: "models/default" },
      out: { type: "string", default: "." },
      seed: { type: "string", default: "0" },
    },
  });
  const modelDir = values.model!;
  if (!existsSync(join(modelDir, "config.json"))) {
    console.error(
      `${modelDir}: no config.json; make it first: node --import tsx scripts/make-model.ts --preset default --seed 0 --out ${modelDir} --if-missing`,
    );
    process.exit(2);
  }
  const seed = Number(values.seed);
  if (!Number.isInteger(seed) || seed < 0) {
    console.error(`--seed must be a non-negative integer; got ${JSON.stringify(values.seed)}`);
    process.exit(2);
  }
  const { spec } = inspectCheckpoint(modelDir);
  for (const dir of makeExamples({ spec, out: resolve(values.out!), seed, modelDir }))
    console.log(`wrote ${dir}`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) main();
