/** Tests for TextTokenizer against real tokenizer files (llama2, SmolLM, stories260k) and our byte-level one. */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { isTaskmuxError } from "../../src/errors.ts";
import { buildByteLevelTokenizer } from "../../src/model/maker/byte-level-tokenizer.ts";
import { TextTokenizer } from "../../src/model/tokenizer.ts";

const shared = (path: string) => fileURLToPath(new URL(`../../../shared/${path}`, import.meta.url));
const LLAMA2 = shared("tokenizers/llama2/");
const SMOLLM = shared("tokenizers/smollm/");
const STORIES = shared("models/stories260k/");
const skip = (dir: string) => (existsSync(join(dir, "tokenizer.json")) ? false : `no tokenizer at ${dir}`);

const LILY = "Once upon a time, there was a little girl named Lily.";
const TEXTS = [LILY, "naïve café, 中文, emoji 🙂 and 👨‍👩‍👧", "  two spaces\nnew line\ttab", "x"];
const utf8 = (s: string) => new TextEncoder().encode(s);
const concatBytes = (tok: TextTokenizer, ids: number[]) =>
  Buffer.concat(ids.map((id) => tok.tokenBytes(id)!));

test("llama2: encodes like HF (BOS from the post-processor) and decodes back", { skip: skip(LLAMA2) }, () => {
  const tok = TextTokenizer.load(LLAMA2);
  assert.deepEqual(
    tok.encode(LILY),
    [1, 9038, 2501, 263, 931, 29892, 727, 471, 263, 2217, 7826, 4257, 365, 2354, 29889],
  );
  assert.deepEqual(tok.encode(LILY, { addSpecialTokens: false }), tok.encode(LILY).slice(1));
  assert.equal(tok.vocabSize, 32000);
  assert.equal(tok.bosId, 1);
  assert.deepEqual(tok.eosIds, [2]);
  assert.equal(tok.addBosToken, true);
  assert.equal(tok.hasChatTemplate, false);
  assert.ok(tok.isSpecial(1) && tok.isSpecial(2) && !tok.isSpecial(9038));
  for (const text of TEXTS) assert.equal(tok.decode(tok.encode(text), { skipSpecialTokens: true }), text);
  assert.equal(tok.decode(tok.encode(LILY)), `<s> ${LILY}`);
});

test("llama2: token strings and bytes (metaspace, byte fallback)", { skip: skip(LLAMA2) }, () => {
  const tok = TextTokenizer.load(LLAMA2);
  assert.equal(tok.tokenString(9038), "▁Once");
  assert.deepEqual(tok.tokenBytes(9038), utf8(" Once"));
  assert.equal(tok.tokenId("<0x0A>"), 13);
  assert.deepEqual(tok.tokenBytes(13), Uint8Array.of(0x0a));
  const ids = tok.encode("🙂", { addSpecialTokens: false });
  assert.ok(
    ids.every((id) => /^(<0x[0-9A-F]{2}>|▁)$/.test(tok.tokenString(id))),
    "🙂 falls back to bytes",
  );
  assert.deepEqual(concatBytes(tok, ids), Buffer.from(utf8(" 🙂")));
  assert.equal(tok.tokenBytes(40000), null);
  assert.equal(tok.tokenString(40000), "");
});

test("smollm: ChatML template, special tokens, round trip", { skip: skip(SMOLLM) }, () => {
  const tok = TextTokenizer.load(SMOLLM);
  assert.equal(tok.vocabSize, 49152);
  assert.equal(tok.bosId, 1); // <|im_start|>; SmolLM never adds it to plain text
  assert.equal(tok.addBosToken, false);
  assert.deepEqual(tok.eosIds, [2, 0]); // eos_token <|im_end|>, then <|endoftext|>
  assert.equal(tok.hasChatTemplate, true);
  // SmolLM (v1) Instruct's template has no default system prompt.
  assert.equal(
    tok.applyChatTemplate([{ role: "user", content: "Hi" }]),
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
  );
  assert.equal(
    tok.applyChatTemplate([{ role: "user", content: "Hi" }], { addGenerationPrompt: false }),
    "<|im_start|>user\nHi<|im_end|>\n",
  );
  const chat = tok.encode(tok.applyChatTemplate([{ role: "user", content: "Hi" }]));
  assert.equal(chat[0], 1);
  assert.ok(chat.includes(2));
  for (const text of TEXTS) {
    const ids = tok.encode(text);
    assert.equal(tok.decode(ids), text);
    assert.deepEqual(concatBytes(tok, ids), Buffer.from(utf8(text)));
  }
  assert.equal(tok.tokenString(tok.encode(" the")[0]!), "Ġthe");
  assert.equal(tok.decode([1, ...tok.encode("Hi"), 2], { skipSpecialTokens: true }), "Hi");
  assert.equal(tok.decode([1, ...tok.encode("Hi"), 2]), "<|im_start|>Hi<|im_end|>");
  assert.ok(tok.isSpecial(0) && tok.isSpecial(16) && !tok.isSpecial(17));
});

test("stories260k: 512 ids, byte fallback, BOS like llama2", { skip: skip(STORIES) }, () => {
  const tok = TextTokenizer.load(STORIES);
  assert.equal(tok.vocabSize, 512);
  assert.equal(tok.addBosToken, true);
  assert.deepEqual(tok.eosIds, [2]);
  const ids = tok.encode(LILY);
  assert.equal(ids[0], 1);
  assert.equal(tok.decode(ids, { skipSpecialTokens: true }), LILY);
  for (const text of TEXTS) assert.equal(tok.decode(tok.encode(text), { skipSpecialTokens: true }), text);
  const chinese = tok.encode("中", { addSpecialTokens: false });
  assert.ok(chinese.some((id) => tok.tokenString(id) === "<0xE4>"));
});

test("our byte-level tokenizer: bytes reverse bytes_to_unicode", () => {
  const { tokenizerJson, tokenizerConfig } = buildByteLevelTokenizer({ vocabSize: 2048 });
  const tok = TextTokenizer.fromJson(tokenizerJson, tokenizerConfig);
  assert.equal(tok.vocabSize, 2048);
  for (const text of TEXTS) assert.deepEqual(concatBytes(tok, tok.encode(text)), Buffer.from(utf8(text)));
  assert.deepEqual(tok.tokenBytes(2047), utf8("<|im_end|>"));
  assert.equal(tok.decode([]), "");
});

test("load: a clear unsupported_model error naming the missing or broken file", () => {
  const dir = mkdtempSync(join(tmpdir(), "taskmux-tok-"));
  try {
    assertModelError(() => TextTokenizer.load(dir), "tokenizer.json");
    writeFileSync(join(dir, "tokenizer.json"), "{}");
    assertModelError(() => TextTokenizer.load(dir), "tokenizer_config.json");
    writeFileSync(join(dir, "tokenizer_config.json"), "not json");
    assertModelError(() => TextTokenizer.load(dir), "tokenizer_config.json");
    writeFileSync(join(dir, "tokenizer_config.json"), "{}");
    assertModelError(() => TextTokenizer.load(dir), "tokenizer.json");
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test("applyChatTemplate: invalid_request without a template or when rendering fails", () => {
  const { tokenizerJson, tokenizerConfig } = buildByteLevelTokenizer({ vocabSize: 512 });
  const noTemplate = TextTokenizer.fromJson(tokenizerJson, { ...tokenizerConfig, chat_template: undefined });
  assert.throws(
    () => noTemplate.applyChatTemplate([{ role: "user", content: "Hi" }]),
    isInvalid(/no chat template/),
  );
  const strict = TextTokenizer.fromJson(tokenizerJson, tokenizerConfig, {
    chatTemplate:
      "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}ok",
  });
  assert.throws(() => strict.applyChatTemplate([{ role: "user", content: "Hi" }]), isInvalid(/system first/));
  assert.equal(strict.applyChatTemplate([{ role: "system", content: "" }]), "ok");
});

function assertModelError(fn: () => unknown, file: string): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(isTaskmuxError(error));
    assert.equal(error.type, "unsupported_model");
    assert.equal(error.param, file);
    assert.match(error.message, new RegExp(file.replace(".", "\\.")));
    return true;
  });
}

const isInvalid = (message: RegExp) => (error: unknown) => {
  assert.ok(isTaskmuxError(error));
  assert.equal(error.type, "invalid_request");
  assert.match(error.message, message);
  return true;
};
