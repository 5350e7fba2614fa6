/**
 * @module test/helpers/task-fixtures — task folders for the engine task tests, written the way their authors'
 * tools write them (PEFT `save_pretrained` LORA / IA3 / PROMPT_TUNING / PREFIX_TUNING folders, our BOTTLENECK
 * folder, `soft_prompt.safetensors`, `task.json`), with seeded random weights large enough to move the tiny
 * model's outputs visibly. Every writer also returns the weights in the form the reference forward pass takes,
 * computed here from the raw tensors (PEFT's semantics written out again, not taken from src/adapters), plus
 * helpers to run a request through the served path and compare it with `referenceForward`.
 */
import assert from "node:assert/strict";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { EngineEvent } from "../../src/engine/events.ts";
import type { GenerationService, PromptInput } from "../../src/engine/service.ts";
import type { BaseWeights, LayerWeights } from "../../src/model/checkpoint.ts";
import {
  type BottleneckModuleWeights,
  type LoraModuleWeights,
  moduleKey,
  PROJECTIONS,
  type Projection,
  type SequenceAdapterWeights,
} from "../../src/model/contract.ts";
import { makeRng, type Rng } from "../../src/model/maker/prng.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { logSoftmax, type ReferenceInput, referenceForward } from "../../src/model/reference.ts";
import { serializeSafetensors } from "../../src/model/safetensors.ts";
import { madeModelDir } from "./tiny-model.ts";

type Tensors = Record<string, { shape: number[]; data: Float32Array }>;

// ---------------------------------------------------------------------------------------------------------
// folders

/** A fresh temp task root; call the returned `cleanup` in `after`. */
export function makeTaskRoot(prefix = "taskmux-tasks-"): { root: string; cleanup: () => void } {
  const root = mkdtempSync(join(tmpdir(), prefix));
  return { root, cleanup: () => rmSync(root, { recursive: true, force: true }) };
}

function writeFiles(root: string, name: string, files: Record<string, unknown>): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  for (const [file, content] of Object.entries(files)) {
    writeFileSync(
      join(dir, file),
      content instanceof Uint8Array ? content : JSON.stringify(content, null, 2),
    );
  }
  return dir;
}

/**
 * The tiny model with `add_bos_token: true` (same weights, so the same graph cache entry): lets the tests see
 * where BOS goes relative to virtual tokens. The plain tiny tokenizer adds no BOS.
 */
export function bosModelDir(): string {
  const src = madeModelDir();
  const dir = `${src}-bos`;
  if (!existsSync(join(dir, "config.json"))) {
    // built beside it and renamed into place, so a test process running in parallel never sees half of it
    const tmp = mkdtempSync(`${dir}.tmp-`);
    for (const f of ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"])
      copyFileSync(join(src, f), join(tmp, f));
    const config = JSON.parse(readFileSync(join(src, "tokenizer_config.json"), "utf8"));
    writeFileSync(join(tmp, "tokenizer_config.json"), JSON.stringify({ ...config, add_bos_token: true }));
    try {
      renameSync(tmp, dir);
    } catch {
      rmSync(tmp, { recursive: true, force: true }); // another process made it first
    }
  }
  return dir;
}

const uniform = (rng: Rng, n: number, lo: number, hi: number) =>
  Float32Array.from({ length: n }, () => lo + (hi - lo) * rng.uniform());

function dims(spec: ModelSpec, m: Projection): { inDim: number; outDim: number } {
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  const table: Record<Projection, [number, number]> = {
    q_proj: [d, q],
    k_proj: [d, kv],
    v_proj: [d, kv],
    o_proj: [q, d],
    gate_proj: [d, ff],
    up_proj: [d, ff],
    down_proj: [ff, d],
  };
  const [inDim, outDim] = table[m];
  return { inDim, outDim };
}

const parentOf = (m: Projection) =>
  m === "gate_proj" || m === "up_proj" || m === "down_proj" ? "mlp" : "self_attn";
const moduleName = (layer: number, m: Projection) => `model.layers.${layer}.${parentOf(m)}.${m}`;

// ---------------------------------------------------------------------------------------------------------
// LoRA

export interface LoraFixtureOptions {
  r: number;
  alpha: number;
  targets: Projection[];
  useRslora?: boolean;
  rankPattern?: Record<string, number>;
  alphaPattern?: Record<string, number>;
  layersToTransform?: number[];
  seed: number;
  /** std of lora_B (PEFT initialises it to zero; trained ones are not): default 0.2 */
  bStd?: number;
  /** write `lora_A.default.weight` keys without the `base_model.model.` prefix (both are accepted) */
  altKeys?: boolean;
  /** extra adapter_config.json keys */
  extraConfig?: Record<string, unknown>;
}

export interface LoraFixtureModule {
  layer: number;
  projection: Projection;
  r: number;
  alpha: number;
  /** alpha / r, or alpha / sqrt(r) with use_rslora */
  scale: number;
  /** [r, in] */
  a: Float32Array;
  /** [out, r], unscaled, as stored */
  b: Float32Array;
}

export interface LoraFixture {
  dir: string;
  modules: LoraFixtureModule[];
  /** the largest rank written */
  maxRank: number;
}

/** PEFT's get_pattern_key: first key (insertion order) with re.match(rf"(.*\.)?({key})$", name). */
function pattern(patterns: Record<string, number> | undefined, name: string, fallback: number): number {
  for (const [key, value] of Object.entries(patterns ?? {}))
    if (new RegExp(`^(?:.*\\.)?(?:${key})$`).test(name)) return value;
  return fallback;
}

/** A PEFT LORA folder as `save_pretrained` writes it (A ~ N(0, 1/in), B ~ N(0, bStd)). */
export function writeLoraTask(
  root: string,
  name: string,
  spec: ModelSpec,
  o: LoraFixtureOptions,
  extraFiles: Record<string, unknown> = {},
): LoraFixture {
  const rng = makeRng(o.seed);
  const modules: LoraFixtureModule[] = [];
  const tensors: Tensors = {};
  for (let layer = 0; layer < spec.numLayers; layer++) {
    if (o.layersToTransform && !o.layersToTransform.includes(layer)) continue;
    for (const projection of PROJECTIONS) {
      if (!o.targets.includes(projection)) continue;
      const full = moduleName(layer, projection);
      const r = pattern(o.rankPattern, full, o.r);
      const alpha = pattern(o.alphaPattern, full, o.alpha);
      const { inDim, outDim } = dims(spec, projection);
      const a = rng.normals(r * inDim, 1 / Math.sqrt(inDim));
      const b = rng.normals(outDim * r, o.bStd ?? 0.2);
      const scale = o.useRslora ? alpha / Math.sqrt(r) : alpha / r;
      modules.push({ layer, projection, r, alpha, scale, a, b });
      const key = o.altKeys ? full : `base_model.model.${full}`;
      const suffix = o.altKeys ? ".default.weight" : ".weight";
      tensors[`${key}.lora_A${suffix}`] = { shape: [r, inDim], data: a };
      tensors[`${key}.lora_B${suffix}`] = { shape: [outDim, r], data: b };
    }
  }
  const config: Record<string, unknown> = {
    peft_type: "LORA",
    task_type: "CAUSAL_LM",
    base_model_name_or_path: "tiny",
    r: o.r,
    lora_alpha: o.alpha,
    lora_dropout: 0.05,
    target_modules: o.targets,
    bias: "none",
    fan_in_fan_out: false,
    inference_mode: true,
    use_rslora: o.useRslora ?? false,
    rank_pattern: o.rankPattern ?? {},
    alpha_pattern: o.alphaPattern ?? {},
    layers_to_transform: o.layersToTransform ?? null,
    ...o.extraConfig,
  };
  const dir = writeFiles(root, name, {
    "adapter_config.json": config,
    "adapter_model.safetensors": serializeSafetensors(tensors),
    ...extraFiles,
  });
  return { dir, modules, maxRank: Math.max(...modules.map((m) => m.r)) };
}

/** The reference's LoRA input: b scaled by s (what `y = x W^T + (x A^T) B^T s` needs). */
export function loraAdapterWeights(fixture: LoraFixture): SequenceAdapterWeights {
  const lora = new Map<string, LoraModuleWeights>();
  for (const m of fixture.modules)
    lora.set(moduleKey(m.layer, m.projection), {
      rank: m.r,
      a: m.a,
      b: Float32Array.from(m.b, (v) => v * m.scale),
    });
  return { lora };
}

const WEIGHT_OF: Record<Projection, keyof LayerWeights> = {
  q_proj: "qProj",
  k_proj: "kProj",
  v_proj: "vProj",
  o_proj: "oProj",
  gate_proj: "gateProj",
  up_proj: "upProj",
  down_proj: "downProj",
};

/** Base weights with `W + s·B·A` merged into every adapted projection (float64 accumulate, float32 store). */
export function mergeLora(spec: ModelSpec, base: BaseWeights, fixture: LoraFixture): BaseWeights {
  const layers = base.layers.map((l) => ({ ...l }));
  for (const m of fixture.modules) {
    const field = WEIGHT_OF[m.projection];
    const { inDim, outDim } = dims(spec, m.projection);
    const w = Float32Array.from(layers[m.layer]![field] as Float32Array);
    for (let o = 0; o < outDim; o++) {
      for (let i = 0; i < inDim; i++) {
        let delta = 0;
        for (let k = 0; k < m.r; k++) delta += m.b[o * m.r + k]! * m.a[k * inDim + i]!;
        w[o * inDim + i] = w[o * inDim + i]! + m.scale * delta;
      }
    }
    (layers[m.layer] as unknown as Record<string, Float32Array>)[field] = w;
  }
  return { ...base, layers };
}

// ---------------------------------------------------------------------------------------------------------
// IA3

export interface Ia3FixtureOptions {
  targets: Projection[];
  /** default ["down_proj"] when targeted */
  feedforward?: Projection[];
  seed: number;
  /** vectors uniform in [1 - spread, 1 + spread]; default 0.5 */
  spread?: number;
}

/** A PEFT IA3 folder: `ia3_l` [out, 1] for output-scaled targets, [1, in] for feed-forward ones. */
export function writeIa3Task(
  root: string,
  name: string,
  spec: ModelSpec,
  o: Ia3FixtureOptions,
  extraFiles: Record<string, unknown> = {},
): { dir: string; adapters: SequenceAdapterWeights } {
  const rng = makeRng(o.seed);
  const feedforward = o.feedforward ?? o.targets.filter((t) => t === "down_proj");
  const spread = o.spread ?? 0.5;
  const tensors: Tensors = {};
  const ia3 = new Map<string, Float32Array>();
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const projection of PROJECTIONS) {
      if (!o.targets.includes(projection)) continue;
      const ff = feedforward.includes(projection);
      const { inDim, outDim } = dims(spec, projection);
      const n = ff ? inDim : outDim;
      const v = uniform(rng, n, 1 - spread, 1 + spread);
      tensors[`base_model.model.${moduleName(layer, projection)}.ia3_l`] = {
        shape: ff ? [1, n] : [n, 1],
        data: v,
      };
      ia3.set(moduleKey(layer, projection), v);
    }
  }
  const dir = writeFiles(root, name, {
    "adapter_config.json": {
      peft_type: "IA3",
      task_type: "CAUSAL_LM",
      base_model_name_or_path: "tiny",
      target_modules: o.targets,
      feedforward_modules: feedforward,
      fan_in_fan_out: false,
      inference_mode: true,
      init_ia3_weights: true,
    },
    "adapter_model.safetensors": serializeSafetensors(tensors),
    ...extraFiles,
  });
  return { dir, adapters: { ia3 } };
}

// ---------------------------------------------------------------------------------------------------------
// bottleneck (ours)

/** Our BOTTLENECK folder (adapters/README.md): per layer and placement, down [N, D] + bias, up [D, N] + bias. */
export function writeBottleneckTask(
  root: string,
  name: string,
  spec: ModelSpec,
  o: { size: number; placement?: ("attn" | "mlp")[]; seed: number; std?: number },
): { dir: string; adapters: SequenceAdapterWeights } {
  const rng = makeRng(o.seed);
  const placement = o.placement ?? ["attn", "mlp"];
  const D = spec.hiddenSize;
  const n = o.size;
  const std = o.std ?? 0.5;
  const tensors: Tensors = {};
  const bottleneck = new Map<string, BottleneckModuleWeights>();
  for (let layer = 0; layer < spec.numLayers; layer++) {
    for (const p of placement) {
      const w: BottleneckModuleWeights = {
        size: n,
        down: rng.normals(n * D, std),
        downBias: rng.normals(n, 0.1),
        up: rng.normals(D * n, std),
        upBias: rng.normals(D, 0.1),
      };
      const k = `layers.${layer}.${p}`;
      tensors[`${k}.adapter_down.weight`] = { shape: [n, D], data: w.down };
      tensors[`${k}.adapter_down.bias`] = { shape: [n], data: w.downBias };
      tensors[`${k}.adapter_up.weight`] = { shape: [D, n], data: w.up };
      tensors[`${k}.adapter_up.bias`] = { shape: [D], data: w.upBias };
      bottleneck.set(moduleKey(layer, p), w);
    }
  }
  const dir = writeFiles(root, name, {
    "adapter_config.json": { peft_type: "BOTTLENECK", adapter_size: n, non_linearity: "silu", placement },
    "adapter_model.safetensors": serializeSafetensors(tensors),
  });
  return { dir, adapters: { bottleneck } };
}

// ---------------------------------------------------------------------------------------------------------
// soft prompts, prefixes, task.json

/** Soft-prompt rows [n, hidden] ~ N(0, std) (default 1: far larger than the tiny model's token embeddings). */
export function softPromptRows(spec: ModelSpec, n: number, seed: number, std = 1): Float32Array {
  return makeRng(seed).normals(n * spec.hiddenSize, std);
}

/** A PEFT PROMPT_TUNING folder (`prompt_embeddings` [n, hidden]); `extraFiles` may add a task.json. */
export function writePromptTuningTask(
  root: string,
  name: string,
  spec: ModelSpec,
  o: { numVirtualTokens: number; seed: number },
  extraFiles: Record<string, unknown> = {},
): { dir: string; rows: Float32Array } {
  const rows = softPromptRows(spec, o.numVirtualTokens, o.seed);
  const dir = writeFiles(root, name, {
    "adapter_config.json": {
      peft_type: "PROMPT_TUNING",
      task_type: "CAUSAL_LM",
      base_model_name_or_path: "tiny",
      num_virtual_tokens: o.numVirtualTokens,
      token_dim: spec.hiddenSize,
      num_transformer_submodules: 1,
      num_attention_heads: spec.numHeads,
      num_layers: spec.numLayers,
      prompt_tuning_init: "RANDOM",
      inference_mode: true,
    },
    "adapter_model.safetensors": serializeSafetensors({
      prompt_embeddings: { shape: [o.numVirtualTokens, spec.hiddenSize], data: rows },
    }),
    ...extraFiles,
  });
  return { dir, rows };
}

/** Our `soft_prompt.safetensors` file content. */
export function softPromptFile(spec: ModelSpec, rows: Float32Array): Uint8Array {
  return serializeSafetensors({
    prompt_embeddings: { shape: [rows.length / spec.hiddenSize, spec.hiddenSize], data: rows },
  });
}

/** A folder with just these files (task.json objects, safetensors bytes). */
export function writeTaskFolder(root: string, name: string, files: Record<string, unknown>): string {
  return writeFiles(root, name, files);
}

export interface PrefixFixture {
  dir: string;
  /** the reference's `prefix` input: per layer [KVH, n, HS] */
  prefix: NonNullable<ReferenceInput["prefix"]>;
}

/**
 * A PEFT PREFIX_TUNING folder for a grouped-query base: `prompt_embeddings` [n, L * 2 * KVH * HS]. The split
 * into per-layer keys and values is PEFT's get_prompt written out: view(n, 2L, KVH, HS), permute so that
 * slice 2l is layer l's key and 2l + 1 its value, each [KVH, n, HS].
 */
export function writePrefixTask(
  root: string,
  name: string,
  spec: ModelSpec,
  o: { numVirtualTokens: number; seed: number; std?: number },
): PrefixFixture {
  const { numLayers: L, numKvHeads: KVH, headDim: HS } = spec;
  const n = o.numVirtualTokens;
  const width = L * 2 * KVH * HS;
  const table = makeRng(o.seed).normals(n * width, o.std ?? 1);
  const keys = Array.from({ length: L }, () => new Float32Array(KVH * n * HS));
  const values = Array.from({ length: L }, () => new Float32Array(KVH * n * HS));
  // table[t, j, h, d] with j in 0..2L-1  ->  (j even ? keys : values)[j / 2][h, t, d]
  for (let t = 0; t < n; t++)
    for (let j = 0; j < 2 * L; j++)
      for (let h = 0; h < KVH; h++)
        for (let d = 0; d < HS; d++) {
          const v = table[((t * 2 * L + j) * KVH + h) * HS + d]!;
          (j % 2 === 0 ? keys : values)[Math.floor(j / 2)]![(h * n + t) * HS + d] = v;
        }
  const dir = writeFiles(root, name, {
    "adapter_config.json": {
      peft_type: "PREFIX_TUNING",
      task_type: "CAUSAL_LM",
      base_model_name_or_path: "tiny",
      num_virtual_tokens: n,
      token_dim: KVH * HS,
      num_transformer_submodules: 1,
      num_attention_heads: KVH,
      num_layers: L,
      prefix_projection: false,
      inference_mode: true,
    },
    "adapter_model.safetensors": serializeSafetensors({
      prompt_embeddings: { shape: [n, width], data: table },
    }),
  });
  return { dir, prefix: { length: n, keys, values } };
}

// ---------------------------------------------------------------------------------------------------------
// running and comparing

/** top-k asked for on every prompt position and every generated token (more values compared per row). */
export const TOP_K = 8;

export interface ServedRun {
  promptTokens: number[];
  /** prompt_logprobs entries (entry 0 has logprob null) */
  promptEntries: {
    tokenId: number;
    logprob: number | null;
    topLogprobs: { token: number; logprob: number }[];
  }[];
  tokens: number[];
  logprobs: number[];
  tops: { token: number; logprob: number }[][];
  finish: EngineEvent | null;
}

export interface RunOptions {
  requestId?: string;
  task: string | null;
  prompt: PromptInput;
  maxTokens: number;
  fields?: Record<string, string>;
  /** also asks for prompt logprobs (default true) */
  scorePrompt?: boolean;
  /** called on every event, e.g. to check the pool table while the request runs */
  onEvent?: (event: EngineEvent, tokensSoFar: number) => void;
}

/** A request admitted to the engine (its task resolved, adapter slots pinned); `result` settles when it ends. */
export interface StartedRun {
  promptTokens: number[];
  result: Promise<ServedRun>;
}

/** Start a greedy request; resolves once the request was admitted to the engine (wrapped, so not flattened). */
export async function startRun(service: GenerationService, o: RunOptions): Promise<StartedRun> {
  const handle = await service.generate({
    requestId: o.requestId ?? `r-${Math.random().toString(36).slice(2)}`,
    prompt: o.prompt,
    task: o.task,
    fields: o.fields,
    params: {
      temperature: 0,
      maxTokens: o.maxTokens,
      logprobs: TOP_K,
      promptLogprobs: (o.scorePrompt ?? true) ? TOP_K : null,
      ignoreEos: true,
    },
  });
  const result = (async () => {
    const run: ServedRun = {
      promptTokens: handle.promptTokens,
      promptEntries: [],
      tokens: [],
      logprobs: [],
      tops: [],
      finish: null,
    };
    for await (const e of handle.events) {
      if (e.type === "token") {
        run.tokens.push(e.tokenId);
        run.logprobs.push(e.logprob!);
        run.tops.push(e.topLogprobs ?? []);
      } else if (e.type === "prompt_logprobs") run.promptEntries = e.entries;
      else run.finish = e;
      o.onEvent?.(e, run.tokens.length);
    }
    return run;
  })();
  return { promptTokens: handle.promptTokens, result };
}

export async function runServed(service: GenerationService, o: RunOptions): Promise<ServedRun> {
  return (await startRun(service, o)).result;
}

export function assertFinished(run: ServedRun, what: string): void {
  assert.equal(run.finish?.type, "finished", `${what}: ${JSON.stringify(run.finish)}`);
}

export interface ReferenceRun {
  spec: ModelSpec;
  weights: BaseWeights;
  /** ReferenceInput minus tokens */
  input?: Omit<ReferenceInput, "tokens">;
}

/** Greedy ties closer than this in the reference are not held against the served path. */
const TIE = 1e-4;

/**
 * Compare a served run with the reference run over prompt + generated tokens: every prompt logprob (and its
 * top-k values) and every generated token's logprob and top-k within `tol`; every greedy token must be the
 * reference's argmax (unless the reference's top two are within 1e-4). Returns the largest |difference|.
 */
export function compareWithReference(run: ServedRun, ref: ReferenceRun, tol: number, what: string): number {
  const { spec } = ref;
  const V = spec.vocabSize;
  const all = [...run.promptTokens, ...run.tokens.slice(0, -1)];
  const logits = referenceForward(spec, ref.weights, { ...ref.input, tokens: all });
  const row = (t: number) => logSoftmax(logits.subarray(t * V, (t + 1) * V));
  let maxErr = 0;
  const check = (got: number, want: number, where: string) => {
    const err = Math.abs(got - want);
    maxErr = Math.max(maxErr, err);
    assert.ok(err <= tol, `${what}: ${where}: served ${got}, reference ${want} (|diff| ${err} > ${tol})`);
  };
  const P = run.promptTokens.length;
  if (run.promptEntries.length > 0) {
    assert.equal(run.promptEntries.length, P, `${what}: one prompt_logprobs entry per prompt token`);
    for (let i = 1; i < P; i++) {
      const e = run.promptEntries[i]!;
      const lsm = row(i - 1);
      assert.equal(e.tokenId, run.promptTokens[i]);
      // a virtual prompt token has no vocabulary logprob; only real ones are compared
      if (e.tokenId < V) check(e.logprob!, lsm[e.tokenId]!, `prompt position ${i}`);
      assert.equal(e.topLogprobs.length, TOP_K);
      for (const t of e.topLogprobs)
        check(t.logprob, lsm[t.token]!, `prompt position ${i} top token ${t.token}`);
    }
  }
  run.tokens.forEach((token, j) => {
    const lsm = row(P - 1 + j);
    let best = 0;
    for (let v = 1; v < V; v++) if (lsm[v]! > lsm[best]!) best = v;
    if (token !== best)
      assert.ok(
        lsm[best]! - lsm[token]! < TIE,
        `${what}: generated token ${j} is ${token}, the reference's argmax is ${best} (gap ${lsm[best]! - lsm[token]!})`,
      );
    check(run.logprobs[j]!, lsm[token]!, `generated token ${j}`);
    for (const t of run.tops[j]!)
      check(t.logprob, lsm[t.token]!, `generated token ${j} top token ${t.token}`);
  });
  return maxErr;
}

/** Same greedy tokens, logprobs (and top-k values) within tol; returns the largest |difference|. */
export function compareRuns(a: ServedRun, b: ServedRun, tol: number, what: string): number {
  assert.deepEqual(a.promptTokens, b.promptTokens, `${what}: prompt tokens`);
  assert.deepEqual(a.tokens, b.tokens, `${what}: greedy tokens`);
  let maxErr = 0;
  const check = (x: number, y: number, where: string) => {
    const err = Math.abs(x - y);
    maxErr = Math.max(maxErr, err);
    assert.ok(err <= tol, `${what}: ${where}: ${x} vs ${y} (|diff| ${err} > ${tol})`);
  };
  for (const [j, v] of a.logprobs.entries()) check(v, b.logprobs[j]!, `token ${j}`);
  a.tops.forEach((top, j) => {
    const other = new Map(b.tops[j]!.map((t) => [t.token, t.logprob]));
    for (const t of top)
      if (other.has(t.token)) check(t.logprob, other.get(t.token)!, `token ${j} top ${t.token}`);
  });
  assert.equal(a.promptEntries.length, b.promptEntries.length, `${what}: prompt_logprobs entries`);
  a.promptEntries.forEach((e, i) => {
    const f = b.promptEntries[i]!;
    if (typeof e.logprob === "number" && typeof f.logprob === "number")
      check(e.logprob, f.logprob, `prompt ${i}`);
  });
  return maxErr;
}

/** Largest |difference| between two runs' generated-token logprobs (to show an adapter changes the output). */
export function logprobDistance(a: ServedRun, b: ServedRun): number {
  if (a.tokens.join() !== b.tokens.join()) return Number.POSITIVE_INFINITY;
  return Math.max(...a.logprobs.map((v, i) => Math.abs(v - b.logprobs[i]!)));
}

/** A running maximum with a label, printed by the tests (the reply reports the measured errors). */
export class ErrorLog {
  private readonly entries = new Map<string, number>();
  add(label: string, err: number): void {
    this.entries.set(label, Math.max(this.entries.get(label) ?? 0, err));
  }
  report(file: string): void {
    for (const [label, err] of this.entries)
      console.log(`# ${file} max |diff| ${label}: ${err.toExponential(2)}`);
  }
}

export interface StaggeredResult {
  batched: ServedRun[];
  /** How many early requests had finished when the late ones were admitted. */
  earlyFinishedWhenLateJoined: number;
  /** Most sequences running at once. */
  peak: number;
}

/**
 * Run `requests` batched: the first `numEarly` start together, the rest join once the early ones decode,
 * so prefill chunks of the late ones share steps with decode rows.
 */
export async function runStaggered(
  service: GenerationService,
  numRunning: () => number,
  requests: readonly Omit<RunOptions, "maxTokens">[],
  maxTokens: (i: number) => number,
  numEarly: number,
  idPrefix: string,
): Promise<StaggeredResult> {
  let markDecoding!: () => void;
  const decoding = new Promise<void>((resolve) => {
    markDecoding = resolve;
  });
  let finished = 0;
  let peak = 0;
  const start = (i: number) =>
    startRun(service, {
      ...requests[i]!,
      requestId: `${idPrefix}-${i}`,
      maxTokens: maxTokens(i),
      onEvent: (e) => {
        if (e.type === "token") markDecoding();
        if (e.type === "finished") finished++;
        peak = Math.max(peak, numRunning());
      },
    });
  const early = await Promise.all([...Array(numEarly).keys()].map(start));
  await decoding;
  const late = await Promise.all(
    [...Array(requests.length - numEarly).keys()].map((k) => start(numEarly + k)),
  );
  const earlyFinishedWhenLateJoined = finished;
  const batched = await Promise.all([...early, ...late].map((s) => s.result));
  return { batched, earlyFinishedWhenLateJoined, peak };
}
