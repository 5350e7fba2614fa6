/** Tests for makeModel: deterministic bytes per seed, config matching the preset, loadable by checkpoint + tokenizer. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { loadCheckpoint } from "../../../src/model/checkpoint.ts";
import { makeModel, PRESETS } from "../../../src/model/maker/make-model.ts";
import { TextTokenizer } from "../../../src/model/tokenizer.ts";

const ROOT = mkdtempSync(join(tmpdir(), "taskmux-make-model-"));
after(() => rmSync(ROOT, { recursive: true, force: true }));

const made = new Map<string, string>();
/** Make the tiny preset with `seed` into its own folder (once per name). */
function makeTiny(name: string, seed: number): string {
  const cached = made.get(name);
  if (cached) return cached;
  const out = join(ROOT, name);
  makeModel({ preset: "tiny", seed, out });
  made.set(name, out);
  return out;
}

const sha256 = (file: string) => createHash("sha256").update(readFileSync(file)).digest("hex");
const readJson = (file: string) => JSON.parse(readFileSync(file, "utf8"));

test("the tiny preset made twice with the same seed is byte-identical", () => {
  const a = makeTiny("seed7-a", 7);
  const b = makeTiny("seed7-b", 7);
  assert.equal(sha256(join(a, "model.safetensors")), sha256(join(b, "model.safetensors")));
  for (const file of ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
    assert.equal(sha256(join(a, file)), sha256(join(b, file)), file);
  }
});

test("a different seed gives different weights", () => {
  const a = makeTiny("seed7-a", 7);
  const c = makeTiny("seed8", 8);
  assert.notEqual(sha256(join(a, "model.safetensors")), sha256(join(c, "model.safetensors")));
});

test("the folder holds exactly the HF files and no temporary folder is left behind", () => {
  const dir = makeTiny("seed7-a", 7);
  assert.deepEqual(readdirSync(dir).sort(), [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
  ]);
  assert.deepEqual(
    readdirSync(ROOT).filter((name) => name.includes(".tmp-")),
    [],
  );
});

test("config.json carries the tiny preset's dimensions", () => {
  const config = readJson(join(makeTiny("seed7-a", 7), "config.json"));
  const p = PRESETS.tiny;
  assert.deepEqual(
    {
      hidden_size: config.hidden_size,
      num_hidden_layers: config.num_hidden_layers,
      num_attention_heads: config.num_attention_heads,
      num_key_value_heads: config.num_key_value_heads,
      intermediate_size: config.intermediate_size,
      vocab_size: config.vocab_size,
      rope_theta: config.rope_theta,
      max_position_embeddings: config.max_position_embeddings,
    },
    {
      hidden_size: p.hiddenSize,
      num_hidden_layers: p.numLayers,
      num_attention_heads: p.numHeads,
      num_key_value_heads: p.numKvHeads,
      intermediate_size: p.intermediateSize,
      vocab_size: p.vocabSize,
      rope_theta: p.ropeTheta,
      max_position_embeddings: p.maxPositionEmbeddings,
    },
  );
  assert.deepEqual(config.architectures, ["LlamaForCausalLM"]);
  assert.equal(config.tie_word_embeddings, true);
});

test("loadCheckpoint accepts the made model with the preset's shapes", () => {
  const dir = makeTiny("seed7-a", 7);
  const ckpt = loadCheckpoint(dir);
  const p = PRESETS.tiny;
  assert.equal(ckpt.spec.hiddenSize, p.hiddenSize);
  assert.equal(ckpt.spec.numLayers, p.numLayers);
  assert.equal(ckpt.spec.numKvHeads, p.numKvHeads);
  assert.equal(ckpt.spec.headDim, p.hiddenSize / p.numHeads);
  assert.equal(ckpt.weights.embed.length, p.vocabSize * p.hiddenSize);
  assert.equal(ckpt.weights.lmHead, ckpt.weights.embed, "tied embeddings");
  assert.deepEqual(ckpt.generation.eosTokenIds, [p.vocabSize - 3]);
  assert.deepEqual(ckpt.storedDtypes, ["F32"]);
});

test("TextTokenizer loads the made tokenizer and round-trips text", () => {
  const tok = TextTokenizer.load(makeTiny("seed7-a", 7));
  assert.equal(tok.vocabSize, PRESETS.tiny.vocabSize);
  assert.ok(tok.eosIds.includes(PRESETS.tiny.vocabSize - 3));
  for (const text of ["Hello, world!", "naïve café 🙂\nsecond line", "  spaced\tout  "]) {
    const ids = tok.encode(text, { addSpecialTokens: false });
    assert.ok(ids.length > 0 && ids.every((id) => id >= 0 && id < PRESETS.tiny.vocabSize));
    assert.equal(tok.decode(ids), text);
  }
});

test("makeModel replaces an existing folder instead of mixing files", () => {
  const out = join(ROOT, "replaced");
  makeModel({ preset: "tiny", seed: 1, out });
  const first = sha256(join(out, "model.safetensors"));
  makeModel({ preset: "tiny", seed: 2, out });
  assert.notEqual(sha256(join(out, "model.safetensors")), first);
  assert.equal(existsSync(`${out}.tmp-${process.pid}`), false);
});

test("the smollm2-135m and default presets keep their published dimensions", () => {
  assert.deepEqual(PRESETS["smollm2-135m"], {
    hiddenSize: 576,
    numLayers: 30,
    numHeads: 9,
    numKvHeads: 3,
    intermediateSize: 1536,
    vocabSize: 49152,
    ropeTheta: 100000,
    maxPositionEmbeddings: 8192,
  });
  for (const [name, p] of Object.entries(PRESETS)) {
    assert.equal(p.hiddenSize % p.numHeads, 0, `${name}: hidden divisible by heads`);
    assert.equal(p.numHeads % p.numKvHeads, 0, `${name}: heads divisible by kv heads`);
    assert.equal((p.hiddenSize / p.numHeads) % 2, 0, `${name}: even head dim`);
  }
});
