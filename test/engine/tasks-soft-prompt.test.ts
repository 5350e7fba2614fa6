/**
 * Issue 5 acceptance: soft prompts served through the real engine (tiny model, in-process) equal the reference
 * forward pass fed the same embeddings directly (`virtualEmbeddings` + ids >= vocab at the same positions),
 * and a pure prompt-engineering task equals the base model on the rendered text.
 *
 * Tolerance: every prompt logprob, every generated token's logprob and the top-8 logprobs at each of those
 * positions within 1e-4 (absolute, natural log) of log_softmax(referenceForward(...)); every greedy token is
 * the reference's argmax. Batch invariance: identical greedy tokens, logprobs within 1e-4 of the same request
 * run alone.
 *
 * The model is the tiny preset with `add_bos_token: true`, so the tests also pin where BOS goes: a PEFT folder
 * without task.json puts every virtual token before BOS (PeftModelForCausalLM), a template starts with BOS.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { BaseWeights } from "../../src/model/checkpoint.ts";
import { loadCheckpoint } from "../../src/model/checkpoint.ts";
import type { ModelSpec } from "../../src/model/model-spec.ts";
import {
  bosModelDir,
  compareRuns,
  compareWithReference,
  ErrorLog,
  logprobDistance,
  makeTaskRoot,
  type RunOptions,
  runServed,
  runStaggered,
  type ServedRun,
  softPromptFile,
  softPromptRows,
  writePromptTuningTask,
  writeTaskFolder,
} from "../helpers/task-fixtures.ts";
import { startTestStack, type TestStack } from "../helpers/tiny-model.ts";

const TOL = 1e-4;
const errors = new ErrorLog();

describe("soft prompts and prompt templates against the reference (issue 5)", () => {
  const { root, cleanup } = makeTaskRoot();
  let stack: TestStack;
  let spec: ModelSpec;
  let weights: BaseWeights;
  let V: number;
  let BOS: number;
  const enc = (text: string) => stack.model.tokenizer.encode(text, { addSpecialTokens: false });
  const virt = (from: number, count: number) => Array.from({ length: count }, (_, i) => V + from + i);

  // (a) PEFT PROMPT_TUNING, no task.json
  let tableA: Float32Array;
  // (b) PEFT PROMPT_TUNING + task.json with the placeholder first
  let tableB: Float32Array;
  // (c) soft_prompt.safetensors + task.json, split placeholders [3, 5] in the middle
  let tableC: Float32Array;
  // (c2) three groups [2, 1, 4], the last one at the very end, two fields
  let tableC2: Float32Array;

  const SYSTEM = "You answer in one word.";
  const FEW_SHOT = [
    { input: { context: "the sky", prompt: "What color is it?" }, output: " Blue." },
    { input: { context: "fresh grass", prompt: "What color is it?" }, output: " Green." },
  ];
  const COT = "Think it through step by step.";

  before(async () => {
    const dir = bosModelDir();
    const checkpoint = loadCheckpoint(dir);
    spec = checkpoint.spec;
    weights = checkpoint.weights;
    V = spec.vocabSize;
    tableA = writePromptTuningTask(root, "pt-plain", spec, { numVirtualTokens: 6, seed: 11 }).rows;
    tableB = writePromptTuningTask(
      root,
      "pt-template",
      spec,
      { numVirtualTokens: 5, seed: 12 },
      { "task.json": { prompt_template: "<|VIRTUAL_PROMPT_0|>{prompt}" } },
    ).rows;
    tableC = softPromptRows(spec, 8, 13);
    writeTaskFolder(root, "split", {
      "soft_prompt.safetensors": softPromptFile(spec, tableC),
      "task.json": {
        prompt_template: "Question: <|VIRTUAL_PROMPT_0|>{prompt}\n<|VIRTUAL_PROMPT_1|>Answer:",
        virtual_token_splits: [3, 5],
      },
    });
    tableC2 = softPromptRows(spec, 7, 14);
    writeTaskFolder(root, "split3", {
      "soft_prompt.safetensors": softPromptFile(spec, tableC2),
      "task.json": {
        prompt_template:
          "<|VIRTUAL_PROMPT_0|>Topic: {topic}<|VIRTUAL_PROMPT_1|> Text: {prompt}<|VIRTUAL_PROMPT_2|>",
        virtual_token_splits: [2, 1, 4],
        fields: ["topic", "prompt"],
      },
    });
    writeTaskFolder(root, "engineered", {
      "task.json": {
        description: "pure prompt engineering: no weights",
        system_prompt: SYSTEM,
        prompt_template: "Context: {context}\nQ: {prompt}\nA:",
        fields: ["context", "prompt"],
        few_shot: FEW_SHOT,
        chain_of_thought: COT,
      },
    });
    stack = await startTestStack({ dir, taskRoots: [root] });
    BOS = stack.model.tokenizer.encode("x")[0]!;
    assert.equal(BOS, spec.bosTokenId, "the BOS variant of the tiny model adds BOS");
  });

  after(async () => {
    await stack?.dispose();
    cleanup();
    errors.report("tasks-soft-prompt");
  });

  const run = (o: Omit<RunOptions, "maxTokens"> & { maxTokens?: number }) =>
    runServed(stack.service, { maxTokens: 8, ...o });
  const reference = (run: ServedRun, table: Float32Array | undefined, label: string) => {
    const err = compareWithReference(run, { spec, weights, input: { virtualEmbeddings: table } }, TOL, label);
    errors.add(label, err);
    return err;
  };

  test("(a) PEFT PROMPT_TUNING without task.json: virtual tokens first, before BOS", async () => {
    const text = "The quick brown fox jumps";
    const r = await run({ task: "pt-plain", prompt: { kind: "text", text } });
    assert.deepEqual(r.promptTokens, [...virt(0, 6), BOS, ...enc(text)]);
    reference(r, tableA, "(a) prompt tuning");
    // the soft prompt moves the output visibly (so the comparison above is not trivially the base model)
    const base = await run({ task: null, prompt: { kind: "text", text } });
    assert.ok(logprobDistance(r, base) > 1e-2, "the soft prompt changes the output");
    // token prompts are served the same way (virtual rows first, then the ids as given)
    const ids = enc("A token prompt");
    const t = await run({ task: "pt-plain", prompt: { kind: "tokens", tokens: ids } });
    assert.deepEqual(t.promptTokens, [...virt(0, 6), ...ids]);
    reference(t, tableA, "(a) prompt tuning, token prompt");
  });

  test("(b) task.json with the placeholder at the start: BOS, then the virtual tokens", async () => {
    const text = "Once upon a time";
    const r = await run({ task: "pt-template", prompt: { kind: "text", text } });
    assert.deepEqual(r.promptTokens, [BOS, ...virt(0, 5), ...enc(text)]);
    reference(r, tableB, "(b) placeholder at start");
  });

  test("(c) split placeholders in the middle ([3, 5]) and three groups ending the prompt ([2, 1, 4])", async () => {
    const text = "where is the cat";
    const r = await run({ task: "split", prompt: { kind: "text", text } });
    assert.deepEqual(r.promptTokens, [
      ...stack.model.tokenizer.encode("Question: "),
      ...virt(0, 3),
      ...enc(`${text}\n`),
      ...virt(3, 5),
      ...enc("Answer:"),
    ]);
    assert.equal(r.promptTokens[0], BOS);
    reference(r, tableC, "(c) splits [3, 5]");

    const r3 = await run({
      task: "split3",
      prompt: { kind: "text", text: "a long day" },
      fields: { topic: "weather" },
    });
    assert.deepEqual(r3.promptTokens, [
      BOS,
      ...virt(0, 2),
      ...enc("Topic: weather"),
      ...virt(2, 1),
      ...enc(" Text: a long day"),
      ...virt(3, 4),
    ]);
    reference(r3, tableC2, "(c) splits [2, 1, 4]");
  });

  test("(d) a pure prompt-engineering task equals the base model on the rendered text", async () => {
    const fields = { context: "the deep sea" };
    const text = "How deep is it?";
    const r = await run({ task: "engineered", prompt: { kind: "text", text }, fields });
    const rendered =
      `${SYSTEM}\n\n` +
      FEW_SHOT.map((ex) => `Context: ${ex.input.context}\nQ: ${ex.input.prompt}\nA:${ex.output}`).join(
        "\n\n",
      ) +
      `\n\nContext: ${fields.context}\nQ: ${text}\nA: ${COT}`;
    const base = await run({ task: null, prompt: { kind: "text", text: rendered } });
    assert.deepEqual(r.promptTokens, stack.model.tokenizer.encode(rendered));
    errors.add("(d) engineered vs base", compareRuns(r, base, TOL, "(d) engineered vs base"));
    reference(r, undefined, "(d) engineered vs reference");
  });

  test("batch invariance: 8 concurrent requests over 4 tasks + base equal each run alone", async () => {
    const requests: Omit<RunOptions, "maxTokens">[] = [
      { task: "pt-plain", prompt: { kind: "text", text: "The quick brown fox" } },
      { task: "split", prompt: { kind: "text", text: "what time is it" } },
      { task: null, prompt: { kind: "text", text: "hello there, general" } },
      { task: "engineered", prompt: { kind: "text", text: "Why?" }, fields: { context: "a cloud" } },
      { task: "pt-template", prompt: { kind: "text", text: "It was a dark and stormy night" } },
      { task: "pt-plain", prompt: { kind: "text", text: "Z" } },
      { task: null, prompt: { kind: "text", text: "one two three four five six seven" } },
      { task: "split", prompt: { kind: "text", text: "who is there and why did they come" } },
    ];
    const maxTokens = (i: number) => 6 + ((i * 3) % 7);
    const alone: ServedRun[] = [];
    for (const [i, q] of requests.entries()) alone.push(await run({ ...q, maxTokens: maxTokens(i) }));
    // half start together; the other half join once the first half decodes (prefill mixed with decode rows)
    const { batched, earlyFinishedWhenLateJoined, peak } = await runStaggered(
      stack.service,
      () => stack.engine.numRunningSequences,
      requests,
      maxTokens,
      4,
      "batch",
    );
    assert.ok(earlyFinishedWhenLateJoined < 4, "the late requests joined while early ones were decoding");
    assert.ok(peak >= 4, `requests shared steps (peak ${peak} running)`);
    batched.forEach((b, i) => {
      assert.equal(b.finish?.type, "finished");
      errors.add("batch vs alone", compareRuns(b, alone[i]!, TOL, `request ${i} (${requests[i]!.task})`));
    });
    // and the batched runs are still the reference's
    reference(batched[0]!, tableA, "(batch) prompt tuning");
    reference(batched[7]!, tableC, "(batch) splits");
    assert.equal(stack.engine.kv.numSequences, 0, "every KV reservation released");
  });
});
