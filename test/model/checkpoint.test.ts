/** Tests for checkpoint loading: single and sharded files, F16/BF16, tying, rejections, generation defaults, hash. */
import assert from "node:assert/strict";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { TaskmuxError } from "../../src/errors.ts";
import { type BaseWeights, inspectCheckpoint, loadCheckpoint } from "../../src/model/checkpoint.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import { halfToFloat, writeSafetensors } from "../../src/model/safetensors.ts";
import { makeRandomModel, makeRng } from "../helpers/random-model.ts";

const ROOT = mkdtempSync(join(tmpdir(), "taskmux-checkpoint-"));
after(() => rmSync(ROOT, { recursive: true, force: true }));

let dirCount = 0;
const freshDir = () => {
  const dir = join(ROOT, `ckpt-${dirCount++}`);
  mkdirSync(dir);
  return dir;
};

type TensorMap = Record<string, { shape: number[]; data: Float32Array }>;

function hfConfig(spec: ModelSpec): Record<string, unknown> {
  return {
    architectures: [spec.architecture],
    hidden_size: spec.hiddenSize,
    num_hidden_layers: spec.numLayers,
    num_attention_heads: spec.numHeads,
    num_key_value_heads: spec.numKvHeads,
    head_dim: spec.headDim,
    intermediate_size: spec.intermediateSize,
    vocab_size: spec.vocabSize,
    rms_norm_eps: spec.rmsNormEps,
    rope_theta: spec.ropeTheta,
    max_position_embeddings: spec.maxPositionEmbeddings,
    tie_word_embeddings: spec.tieWordEmbeddings,
    hidden_act: "silu",
    bos_token_id: spec.bosTokenId,
    eos_token_id: spec.eosTokenIds.length === 1 ? spec.eosTokenIds[0] : spec.eosTokenIds,
  };
}

/** BaseWeights in HF tensor names and shapes. */
function hfTensors(spec: ModelSpec, w: BaseWeights): TensorMap {
  const d = spec.hiddenSize;
  const q = spec.numHeads * spec.headDim;
  const kv = spec.numKvHeads * spec.headDim;
  const ff = spec.intermediateSize;
  const out: TensorMap = {
    "model.embed_tokens.weight": { shape: [spec.vocabSize, d], data: w.embed },
    "model.norm.weight": { shape: [d], data: w.finalNorm },
  };
  if (!spec.tieWordEmbeddings) out["lm_head.weight"] = { shape: [spec.vocabSize, d], data: w.lmHead };
  w.layers.forEach((l, i) => {
    const p = `model.layers.${i}.`;
    out[`${p}input_layernorm.weight`] = { shape: [d], data: l.inputNorm };
    out[`${p}self_attn.q_proj.weight`] = { shape: [q, d], data: l.qProj };
    out[`${p}self_attn.k_proj.weight`] = { shape: [kv, d], data: l.kProj };
    out[`${p}self_attn.v_proj.weight`] = { shape: [kv, d], data: l.vProj };
    out[`${p}self_attn.o_proj.weight`] = { shape: [d, q], data: l.oProj };
    if (l.qBias) out[`${p}self_attn.q_proj.bias`] = { shape: [q], data: l.qBias };
    if (l.kBias) out[`${p}self_attn.k_proj.bias`] = { shape: [kv], data: l.kBias };
    if (l.vBias) out[`${p}self_attn.v_proj.bias`] = { shape: [kv], data: l.vBias };
    out[`${p}post_attention_layernorm.weight`] = { shape: [d], data: l.postNorm };
    out[`${p}mlp.gate_proj.weight`] = { shape: [ff, d], data: l.gateProj };
    out[`${p}mlp.up_proj.weight`] = { shape: [ff, d], data: l.upProj };
    out[`${p}mlp.down_proj.weight`] = { shape: [d, ff], data: l.downProj };
  });
  return out;
}

interface CheckpointOptions {
  spec?: Partial<ModelSpec>;
  seed?: number;
  /** Edit the tensor map before writing (delete, reshape, poison). */
  edit?: (tensors: TensorMap) => void;
  /** Split the tensors round-robin over this many shard files (with an index) instead of one file. */
  shards?: number;
  generationConfig?: Record<string, unknown>;
}

/** Write a random tiny checkpoint into a fresh directory; returns the directory, spec and tensors written. */
function writeCheckpoint(options: CheckpointOptions = {}) {
  const { spec, weights } = makeRandomModel(options.spec, options.seed ?? 1);
  const tensors = hfTensors(spec, weights);
  options.edit?.(tensors);
  const dir = freshDir();
  writeFileSync(join(dir, "config.json"), JSON.stringify(hfConfig(spec)));
  if (options.generationConfig) {
    writeFileSync(join(dir, "generation_config.json"), JSON.stringify(options.generationConfig));
  }
  if (!options.shards) {
    writeSafetensors(join(dir, "model.safetensors"), tensors);
  } else {
    const n = options.shards;
    const files = Array.from({ length: n }, (_, i) => `model-0000${i + 1}-of-0000${n}.safetensors`);
    const parts: TensorMap[] = files.map(() => ({}));
    const weightMap: Record<string, string> = {};
    Object.keys(tensors).forEach((name, i) => {
      parts[i % n]![name] = tensors[name]!;
      weightMap[name] = files[i % n]!;
    });
    files.forEach((f, i) => {
      writeSafetensors(join(dir, f), parts[i]!);
    });
    writeFileSync(
      join(dir, "model.safetensors.index.json"),
      JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }),
    );
  }
  return { dir, spec, weights, tensors };
}

/** Writes a raw safetensors file of 16-bit tensors (F16 or BF16), each given as u16 words. */
function writeHalfSafetensors(
  file: string,
  dtype: "F16" | "BF16",
  tensors: Record<string, { shape: number[]; words: Uint16Array }>,
) {
  let offset = 0;
  const header: Record<string, unknown> = {};
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + t.words.length * 2] };
    offset += t.words.length * 2;
  }
  const headerBytes = Buffer.from(JSON.stringify(header));
  const out = Buffer.alloc(8 + headerBytes.length + offset);
  out.writeBigUInt64LE(BigInt(headerBytes.length), 0);
  headerBytes.copy(out, 8);
  let pos = 8 + headerBytes.length;
  for (const t of Object.values(tensors)) {
    for (const w of t.words) {
      out.writeUInt16LE(w, pos);
      pos += 2;
    }
  }
  writeFileSync(file, out);
}

/** Asserts an unsupported_model TaskmuxError whose message matches every pattern. */
function assertUnsupported(fn: () => unknown, patterns: RegExp[], param?: string) {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof TaskmuxError, String(error));
    assert.equal(error.type, "unsupported_model");
    for (const p of patterns) assert.match(error.message, p);
    if (param !== undefined) assert.equal(error.param, param);
    return true;
  });
}

test("a single-file checkpoint loads with the weights, spec and counts that were written", () => {
  const { dir, spec, weights, tensors } = writeCheckpoint();
  const ckpt = loadCheckpoint(dir);
  assert.deepEqual(ckpt.spec, spec);
  assert.deepEqual(ckpt.weights, weights);
  assert.deepEqual(ckpt.storedDtypes, ["F32"]);
  const total = Object.values(tensors).reduce((n, t) => n + t.data.length, 0);
  assert.equal(ckpt.parameterCount, total);
  assert.equal(ckpt.dir, dir);
  assert.match(ckpt.contentHash, /^[0-9a-f]{64}$/);
});

test("a sharded checkpoint loads through its index exactly like the single-file one", () => {
  const single = loadCheckpoint(writeCheckpoint({ seed: 3 }).dir);
  for (const shards of [2, 3]) {
    const { dir } = writeCheckpoint({ seed: 3, shards });
    const info = inspectCheckpoint(dir);
    assert.equal(info.files.length, shards);
    const sharded = loadCheckpoint(dir, info);
    assert.deepEqual(sharded.weights, single.weights);
    assert.deepEqual(sharded.spec, single.spec);
    assert.equal(sharded.parameterCount, single.parameterCount);
  }
});

test("Qwen2 q/k/v biases are loaded and required", () => {
  const spec = { architecture: "Qwen2ForCausalLM" as const, qkvBias: true };
  const { dir, weights } = writeCheckpoint({ spec });
  const ckpt = loadCheckpoint(dir);
  assert.deepEqual(ckpt.weights.layers[1]!.qBias, weights.layers[1]!.qBias);
  assert.equal(ckpt.weights.layers[0]!.oBias, null);
  const missing = writeCheckpoint({ spec, edit: (t) => delete t["model.layers.0.self_attn.k_proj.bias"] });
  assertUnsupported(() => loadCheckpoint(missing.dir), [/model\.layers\.0\.self_attn\.k_proj\.bias/]);
});

test("F16 and BF16 checkpoints widen every weight exactly", () => {
  for (const dtype of ["F16", "BF16"] as const) {
    const { dir, tensors } = writeCheckpoint({ seed: 5 });
    rmSync(join(dir, "model.safetensors"));
    const rng = makeRng(9);
    // Random finite 16-bit patterns: F16 exponent < 31, BF16 exponent < 255 (no inf/NaN).
    const randomWord = () =>
      dtype === "F16"
        ? (rng.int(2) << 15) | (rng.int(31) << 10) | rng.int(1024)
        : (rng.int(2) << 15) | (rng.int(255) << 7) | rng.int(128);
    const widen = (w: number) =>
      dtype === "F16" ? halfToFloat(w) : new Float32Array(new Uint32Array([w << 16]).buffer)[0]!;
    const half: Record<string, { shape: number[]; words: Uint16Array }> = {};
    for (const [name, t] of Object.entries(tensors)) {
      half[name] = { shape: t.shape, words: Uint16Array.from({ length: t.data.length }, randomWord) };
    }
    writeHalfSafetensors(join(dir, "model.safetensors"), dtype, half);
    const ckpt = loadCheckpoint(dir);
    assert.deepEqual(ckpt.storedDtypes, [dtype]);
    const expected = Float32Array.from(half["model.layers.1.mlp.down_proj.weight"]!.words, widen);
    assert.deepEqual(ckpt.weights.layers[1]!.downProj, expected);
    assert.deepEqual(ckpt.weights.embed, Float32Array.from(half["model.embed_tokens.weight"]!.words, widen));
  }
});

test("tied embeddings reuse embed as lm_head; untied ones require lm_head.weight", () => {
  const tied = loadCheckpoint(writeCheckpoint({ spec: { tieWordEmbeddings: true } }).dir);
  assert.equal(tied.weights.lmHead, tied.weights.embed, "the same array, not a copy");

  const untied = writeCheckpoint({ spec: { tieWordEmbeddings: false } });
  const loaded = loadCheckpoint(untied.dir);
  assert.notEqual(loaded.weights.lmHead, loaded.weights.embed);
  assert.deepEqual(loaded.weights.lmHead, untied.weights.lmHead);
  assert.equal(tied.parameterCount, loaded.parameterCount - 64 * 32, "a tied head is not counted");

  const headless = writeCheckpoint({
    spec: { tieWordEmbeddings: false },
    edit: (t) => delete t["lm_head.weight"],
  });
  assertUnsupported(() => loadCheckpoint(headless.dir), [/missing tensor lm_head\.weight/], "lm_head.weight");
});

test("a tied checkpoint that still ships lm_head.weight uses the shipped head", () => {
  const head = makeRng(11).normals(64 * 32, 0.02);
  const { dir } = writeCheckpoint({
    spec: { tieWordEmbeddings: true },
    edit: (t) => {
      t["lm_head.weight"] = { shape: [64, 32], data: head };
    },
  });
  const ckpt = loadCheckpoint(dir);
  assert.deepEqual(ckpt.weights.lmHead, head);
  assert.notDeepEqual(ckpt.weights.lmHead, ckpt.weights.embed);
});

test("bad weights are rejected with errors naming the tensor", () => {
  const cases: { name: string; edit: (t: TensorMap) => void; patterns: RegExp[]; param: string }[] = [
    {
      name: "missing tensor",
      edit: (t) => delete t["model.layers.1.mlp.up_proj.weight"],
      patterns: [/missing tensor model\.layers\.1\.mlp\.up_proj\.weight/],
      param: "model.layers.1.mlp.up_proj.weight",
    },
    {
      name: "wrong shape",
      edit: (t) => {
        t["model.norm.weight"] = { shape: [16], data: new Float32Array(16) };
      },
      patterns: [/tensor model\.norm\.weight has shape \[16\], config\.json implies \[32\]/],
      param: "model.norm.weight",
    },
    {
      name: "transposed shape",
      edit: (t) => {
        const w = t["model.layers.0.mlp.down_proj.weight"]!;
        t["model.layers.0.mlp.down_proj.weight"] = { shape: [48, 32], data: w.data };
      },
      patterns: [/model\.layers\.0\.mlp\.down_proj\.weight has shape \[48,32\]/],
      param: "model.layers.0.mlp.down_proj.weight",
    },
    {
      name: "NaN weight",
      edit: (t) => {
        t["model.layers.0.self_attn.v_proj.weight"]!.data[5] = Number.NaN;
      },
      patterns: [/model\.layers\.0\.self_attn\.v_proj\.weight holds a non-finite value at index 5/],
      param: "model.layers.0.self_attn.v_proj.weight",
    },
    {
      name: "infinite weight",
      edit: (t) => {
        t["model.embed_tokens.weight"]!.data[0] = Number.NEGATIVE_INFINITY;
      },
      patterns: [/model\.embed_tokens\.weight holds a non-finite value at index 0/],
      param: "model.embed_tokens.weight",
    },
  ];
  for (const c of cases) {
    const { dir } = writeCheckpoint({ edit: c.edit });
    assertUnsupported(() => loadCheckpoint(dir), c.patterns, c.param);
  }
});

test("broken weight files are rejected with errors naming the file", () => {
  const corrupt: { name: string; mangle: (bytes: Buffer) => Buffer; patterns: RegExp[] }[] = [
    { name: "truncated", mangle: (b) => b.subarray(0, b.length - 10), patterns: [/truncated/] },
    {
      name: "bad header JSON",
      mangle: (b) => {
        const copy = Buffer.from(b);
        copy.write("#", 8); // the header's opening brace
        return copy;
      },
      patterns: [/header is not valid JSON/],
    },
    {
      name: "unknown dtype",
      mangle: (b) => {
        const length = Number(b.readBigUInt64LE(0));
        const header = b
          .subarray(8, 8 + length)
          .toString()
          .replace('"dtype":"F32"', '"dtype":"I16"');
        return Buffer.concat([b.subarray(0, 8), Buffer.from(header), b.subarray(8 + length)]); // same length
      },
      patterns: [/dtype I16 is not supported/, /tensor lm_head\.weight/],
    },
  ];
  for (const c of corrupt) {
    const { dir } = writeCheckpoint();
    const file = join(dir, "model.safetensors");
    writeFileSync(file, c.mangle(readFileSync(file)));
    assertUnsupported(() => loadCheckpoint(dir), [new RegExp(file.replaceAll(".", "\\.")), ...c.patterns]);
  }
});

test("a directory without config.json or weights is rejected naming what is missing", () => {
  const noConfig = writeCheckpoint().dir;
  rmSync(join(noConfig, "config.json"));
  assertUnsupported(() => inspectCheckpoint(noConfig), [/config\.json not found/]);

  const noWeights = writeCheckpoint().dir;
  rmSync(join(noWeights, "model.safetensors"));
  assertUnsupported(
    () => inspectCheckpoint(noWeights),
    [/no model\.safetensors or model\.safetensors\.index\.json/],
  );

  const badIndex = writeCheckpoint({ shards: 2 }).dir;
  writeFileSync(join(badIndex, "model.safetensors.index.json"), JSON.stringify({ metadata: {} }));
  assertUnsupported(() => inspectCheckpoint(badIndex), [/index\.json: weight_map missing or malformed/]);
});

test("generation_config.json supplies sampling defaults; do_sample false means greedy", () => {
  // Absent fields stay undefined; compare only the defined ones.
  const defined = (o: object) => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
  const cases: { name: string; generation?: Record<string, unknown>; expected: Record<string, unknown> }[] = [
    {
      name: "no file: eos from config.json",
      expected: { eosTokenIds: [2] },
    },
    {
      name: "sampling defaults",
      generation: {
        do_sample: true,
        temperature: 0.7,
        top_p: 0.9,
        top_k: 40,
        max_new_tokens: 128,
        eos_token_id: 5,
      },
      expected: { temperature: 0.7, topP: 0.9, topK: 40, maxNewTokens: 128, eosTokenIds: [5] },
    },
    {
      name: "do_sample false overrides temperature",
      generation: { do_sample: false, temperature: 0.7, eos_token_id: [2, 9] },
      expected: { temperature: 0, eosTokenIds: [2, 9] },
    },
    {
      name: "no eos in the file falls back to config.json",
      generation: { temperature: 0.5 },
      expected: { temperature: 0.5, eosTokenIds: [2] },
    },
  ];
  for (const c of cases) {
    const { dir } = writeCheckpoint({ generationConfig: c.generation });
    assert.deepEqual(defined(inspectCheckpoint(dir).generation), c.expected, c.name);
  }
  const bad = writeCheckpoint({ generationConfig: { top_p: 1.5 } });
  assertUnsupported(() => inspectCheckpoint(bad.dir), [/generation_config\.json/, /top_p/]);
});

test("contentHash is equal for identical checkpoints and changes when one byte changes", () => {
  const a = writeCheckpoint({ seed: 21 }).dir;
  const b = writeCheckpoint({ seed: 21 }).dir;
  const hashA = inspectCheckpoint(a).contentHash;
  assert.equal(inspectCheckpoint(b).contentHash, hashA);

  const flipped = freshDir();
  cpSync(a, flipped, { recursive: true });
  const file = join(flipped, "model.safetensors");
  const bytes = readFileSync(file);
  bytes[bytes.length - 3]! ^= 0x01;
  writeFileSync(file, bytes);
  assert.notEqual(inspectCheckpoint(flipped).contentHash, hashA);

  const reconfigured = freshDir();
  cpSync(a, reconfigured, { recursive: true });
  const config = JSON.parse(readFileSync(join(reconfigured, "config.json"), "utf8"));
  writeFileSync(join(reconfigured, "config.json"), JSON.stringify({ ...config, rope_theta: 20000 }));
  assert.notEqual(inspectCheckpoint(reconfigured).contentHash, hashA);
});
