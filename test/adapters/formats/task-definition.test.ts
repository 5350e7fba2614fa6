/** Tests for task.json parsing: camelCase output, defaults, and each validation rule with its message. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  parseTaskDefinition,
  templatePlaceholders,
  templateSlots,
} from "../../../src/adapters/formats/task-definition.ts";
import { assertRejects } from "./fixtures.ts";

const FILE = "prompt-tables/x/task.json";

const full = {
  description: "Summarize a document",
  prompt_template: "<|VIRTUAL_PROMPT_0|>Document: {document}\nFocus: {prompt}\n<|VIRTUAL_PROMPT_1|>Summary:",
  virtual_token_splits: [6, 2],
  fields: ["document", "prompt"],
  query_field: "prompt",
  system_prompt: "You are terse.",
  few_shot: [{ input: { document: "The cat sat.", prompt: "animals" }, output: " A cat sat." }],
  chain_of_thought: "Think step by step.",
  defaults: { temperature: 0.3, top_p: 0.9, top_k: 40, max_tokens: 64, stop: "\n\n" },
  truncate_field: "document",
};

describe("task.json", () => {
  test("parses every field into camelCase and normalizes stop to a list", () => {
    const d = parseTaskDefinition(full, FILE);
    assert.deepEqual(d, {
      description: "Summarize a document",
      promptTemplate: full.prompt_template,
      virtualTokenSplits: [6, 2],
      fields: ["document", "prompt"],
      queryField: "prompt",
      systemPrompt: "You are terse.",
      fewShot: [{ input: { document: "The cat sat.", prompt: "animals" }, output: " A cat sat." }],
      chainOfThought: "Think step by step.",
      defaults: { temperature: 0.3, topP: 0.9, topK: 40, maxTokens: 64, stop: ["\n\n"] },
      truncateField: "document",
      numPlaceholders: 2,
    });
  });

  test("a template without virtual tokens is a pure prompt-engineering task", () => {
    const d = parseTaskDefinition(
      { prompt_template: "Answer politely: {prompt}", system_prompt: "Be kind." },
      FILE,
    );
    assert.equal(d.numPlaceholders, 0);
    assert.deepEqual(d.fields, ["prompt"]);
    assert.equal(d.virtualTokenSplits, undefined);
  });

  test("defaults: fields = [query_field], no few-shot, empty sampling defaults", () => {
    const d = parseTaskDefinition({ query_field: "question" }, FILE);
    assert.deepEqual(d, {
      fields: ["question"],
      queryField: "question",
      fewShot: [],
      defaults: {},
      numPlaceholders: 0,
    });
  });

  test("one placeholder needs no splits", () => {
    const d = parseTaskDefinition({ prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}" }, FILE);
    assert.equal(d.numPlaceholders, 1);
    assert.equal(d.virtualTokenSplits, undefined);
  });

  test("lists slots and placeholders in template order", () => {
    assert.deepEqual(templateSlots("{a} {b} {a} <|VIRTUAL_PROMPT_0|>"), ["a", "b"]);
    assert.deepEqual(templatePlaceholders("<|VIRTUAL_PROMPT_1|>x<|VIRTUAL_PROMPT_0|>"), [1, 0]);
  });

  const rejections: [string, Record<string, unknown>, RegExp][] = [
    [
      "a slot not listed in fields",
      { prompt_template: "{prompt} {context}" },
      /slot \{context\} is not listed in fields/,
    ],
    [
      "a placeholder used twice",
      { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}<|VIRTUAL_PROMPT_0|>", virtual_token_splits: [1, 1] },
      /<\|VIRTUAL_PROMPT_0\|> appears twice/,
    ],
    [
      "a gap in placeholder numbers",
      { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}<|VIRTUAL_PROMPT_2|>", virtual_token_splits: [1, 1] },
      /<\|VIRTUAL_PROMPT_1\|> is missing/,
    ],
    [
      "splits of the wrong length",
      { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}", virtual_token_splits: [2, 2] },
      /virtual_token_splits has 2 entries but prompt_template has 1/,
    ],
    [
      "several placeholders without splits",
      { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}<|VIRTUAL_PROMPT_1|>" },
      /virtual_token_splits is required/,
    ],
    ["splits without a template", { virtual_token_splits: [4] }, /needs a prompt_template/],
    [
      "a truncate_field outside fields",
      { truncate_field: "document" },
      /truncate_field "document" is not listed in fields/,
    ],
    [
      "fields without the query field",
      { fields: ["document"], prompt_template: "{document}" },
      /must include query_field "prompt"/,
    ],
    [
      "a few-shot example missing a slot",
      { prompt_template: "{prompt}", few_shot: [{ input: {}, output: "x" }] },
      /few_shot\.0\.input: missing "prompt"/,
    ],
    ["an unknown key (typo)", { few_shots: [] }, /few_shots|[Uu]nrecognized/],
    ["a temperature out of range", { defaults: { temperature: 3 } }, /defaults\.temperature/],
    ["a non-identifier field", { fields: ["prompt", "two words"] }, /fields\.1/],
    [
      "a splits entry of zero",
      { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}", virtual_token_splits: [0] },
      /virtual_token_splits\.0/,
    ],
  ];
  for (const [what, json, pattern] of rejections) {
    test(`rejects ${what}`, () => {
      assertRejects(
        () => parseTaskDefinition(json, FILE),
        "adapter_load_failed",
        new RegExp(FILE.replaceAll(".", "\\.")),
        pattern,
      );
    });
  }
});
