/** Tests for IncrementalDetokenizer: streamed chunks equal decode() exactly and never end mid-character. */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { IncrementalDetokenizer } from "../../src/engine/detokenizer.ts";
import { buildByteLevelTokenizer } from "../../src/model/maker/byte-level-tokenizer.ts";
import { TextTokenizer } from "../../src/model/tokenizer.ts";

const shared = (path: string) => fileURLToPath(new URL(`../../../shared/${path}`, import.meta.url));
const REAL = {
  llama2: shared("tokenizers/llama2/"),
  smollm: shared("tokenizers/smollm/"),
  stories260k: shared("models/stories260k/"),
};

function ours(): TextTokenizer {
  const { tokenizerJson, tokenizerConfig } = buildByteLevelTokenizer({ vocabSize: 2048 });
  return TextTokenizer.fromJson(tokenizerJson, tokenizerConfig);
}

const TOKENIZERS: [string, () => TextTokenizer, string | false][] = [
  ...Object.entries(REAL).map(([name, dir]): [string, () => TextTokenizer, string | false] => [
    name,
    () => TextTokenizer.load(dir),
    existsSync(join(dir, "tokenizer.json")) ? false : `no tokenizer at ${dir}`,
  ]),
  ["byte-level 2048", ours, false],
];

const TEXTS = [
  "Once upon a time, there was a little girl named Lily.",
  "Café, naïve, déjà vu — résumé.",
  "中文测试：你好，世界。",
  "smile 🙂, thumbs 👍🏽, family 👨‍👩‍👧, flag 🇫🇷!",
  "  leading spaces\nnew line, then\ttab and   runs  ",
  " é中🙂",
];

/** Feeds ids one at a time; checks every chunk is whole characters; returns the chunks, flush included. */
function stream(detok: IncrementalDetokenizer, ids: number[]): string[] {
  const chunks = ids.map((id) => detok.push(id));
  chunks.push(detok.flush());
  for (const chunk of chunks) {
    assert.ok(
      !/[\uD800-\uDBFF]$/.test(chunk),
      `chunk ends with half a surrogate pair: ${JSON.stringify(chunk)}`,
    );
    assert.ok(chunk.isWellFormed(), `chunk is not well-formed: ${JSON.stringify(chunk)}`);
  }
  return chunks;
}

for (const [name, make, skip] of TOKENIZERS) {
  test(`${name}: chunks concatenate to decode(ids), with and without special tokens`, { skip }, () => {
    const tok = make();
    for (const text of TEXTS) {
      const ids = tok.encode(text);
      const skipped = stream(new IncrementalDetokenizer(tok), ids);
      assert.equal(skipped.join(""), tok.decode(ids, { skipSpecialTokens: true }), JSON.stringify(text));
      assert.ok(!skipped.join("").includes("\uFFFD"));
      const kept = stream(new IncrementalDetokenizer(tok, [], { skipSpecialTokens: false }), ids);
      assert.equal(kept.join(""), tok.decode(ids), JSON.stringify(text));
    }
  });

  test(`${name}: after a prompt, output is decode(prompt + generated) minus the prompt's text`, {
    skip,
  }, () => {
    const tok = make();
    const ids = tok.encode(TEXTS.join(" "));
    const full = tok.decode(ids, { skipSpecialTokens: true });
    // Every split point, including prompts that end in the middle of a character's bytes.
    for (let k = 0; k <= ids.length; k++) {
      const promptText = tok.decode(ids.slice(0, k), { skipSpecialTokens: true }).replace(/\uFFFD+$/, "");
      const detok = new IncrementalDetokenizer(tok, ids.slice(0, k));
      const out = stream(detok, ids.slice(k)).join("");
      assert.equal(promptText + out, full, `split at ${k}`);
      assert.equal(detok.text, out);
    }
  });

  test(`${name}: random ids (broken UTF-8, specials anywhere) still match decode exactly`, { skip }, () => {
    const tok = make();
    let seed = 12345;
    const next = () => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 1; // a small deterministic LCG
      return seed;
    };
    for (let round = 0; round < 50; round++) {
      // Bias towards low ids: byte tokens and specials sit there in SentencePiece vocabularies.
      const ids = Array.from(
        { length: 1 + (next() % 40) },
        () => next() % (next() % 2 ? 300 : tok.vocabSize),
      );
      for (const skipSpecialTokens of [true, false]) {
        const chunks = stream(new IncrementalDetokenizer(tok, [], { skipSpecialTokens }), ids);
        assert.equal(chunks.join(""), tok.decode(ids, { skipSpecialTokens }), `ids ${JSON.stringify(ids)}`);
      }
    }
  });
}

test("llama2: an emoji split over byte-fallback tokens is held until its last byte", {
  skip: TOKENIZERS[0]![2],
}, () => {
  const tok = TextTokenizer.load(REAL.llama2);
  const ids = tok.encode("Hi 🙂", { addSpecialTokens: false });
  const byteIds = ids.filter((id) => /^<0x[0-9A-F]{2}>$/.test(tok.tokenString(id)));
  assert.equal(byteIds.length, 4);
  const detok = new IncrementalDetokenizer(tok);
  const chunks = ids.map((id) => detok.push(id));
  assert.deepEqual(chunks.slice(-4), ["", "", "", "🙂"]);
  assert.equal(detok.text, "Hi 🙂");
});

test("flush turns unfinished bytes into U+FFFD, as decode does", () => {
  const tok = ours();
  const ids = tok.encode("中");
  assert.ok(ids.length > 1, "中 is more than one token in the 2048 vocab");
  const detok = new IncrementalDetokenizer(tok);
  assert.equal(detok.push(ids[0]!), "");
  assert.equal(detok.flush(), "\uFFFD");
  assert.equal(tok.decode([ids[0]!]), "\uFFFD");
});

test("special tokens: skipped by default, kept (and closing pending bytes) when asked", () => {
  const tok = ours();
  const imEnd = tok.tokenId("<|im_end|>")!;
  const ids = [...tok.encode("ok "), imEnd];
  assert.equal(stream(new IncrementalDetokenizer(tok), ids).join(""), "ok ");
  assert.equal(
    stream(new IncrementalDetokenizer(tok, [], { skipSpecialTokens: false }), ids).join(""),
    "ok <|im_end|>",
  );
  const half = tok.encode("中")[0]!;
  const kept = new IncrementalDetokenizer(tok, [], { skipSpecialTokens: false });
  assert.deepEqual([kept.push(half), kept.push(imEnd)], ["", "\uFFFD<|im_end|>"]);
});
