/** Tests for scripts/make-examples.ts: every example folder loads through loadTaskFolder, files stay small. */
import assert from "node:assert/strict";
import { readdirSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { test } from "node:test";
import { makeExamples } from "../../../scripts/make-examples.ts";
import { loadTaskFolder } from "../../../src/adapters/formats/task-folder.ts";
import { smallSpec, tempDir } from "./fixtures.ts";

/** The embedded default model's shape (models/default): hidden 256, 4 layers, 8 heads / 4 KV heads, MLP 688. */
const defaultSpec = smallSpec({
  hiddenSize: 256,
  numLayers: 4,
  numHeads: 8,
  numKvHeads: 4,
  headDim: 32,
  intermediateSize: 688,
  vocabSize: 2048,
  maxPositionEmbeddings: 2048,
});

test("the examples for the default model load as the tasks they claim to be, each file under 300 KB", () => {
  const out = tempDir();
  const dirs = makeExamples({ spec: defaultSpec, out, seed: 0, modelDir: "models/default" });
  const limits = { maxLoraRank: 16, maxBottleneckSize: 64 };
  const kinds = Object.fromEntries(
    dirs.map((dir) => {
      const p = loadTaskFolder(dir, defaultSpec, limits);
      for (const file of readdirSync(dir))
        assert.ok(statSync(join(dir, file)).size < 300 * 1024, `${dir}/${file} is too big`);
      const what = [
        p.definition && "task",
        p.softPrompt?.source,
        p.lora && `lora r${p.lora.rank}`,
        p.ia3 && "ia3",
        p.bottleneck && `bottleneck ${p.bottleneck.size}`,
      ];
      return [basename(dir), what.filter(Boolean).join("+")];
    }),
  );
  assert.deepEqual(kinds, {
    summarize: "task+prompt_tuning",
    polite: "task",
    "ptune-mlp": "p_tuning_encoder",
    "lora-demo": "lora r8",
    "ia3-demo": "ia3",
    "bottleneck-demo": "bottleneck 16",
  });
  assert.deepEqual(
    readdirSync(join(out, "prompt-tables")).sort(),
    ["polite", "ptune-mlp", "summarize"],
    "no .tmp- folder left behind",
  );
});

test("the examples are reproducible from the seed and fit another base shape", () => {
  const spec = smallSpec();
  const a = makeExamples({ spec, out: tempDir(), seed: 3, modelDir: "m" });
  const b = makeExamples({ spec, out: tempDir(), seed: 3, modelDir: "m" });
  const rows = (dir: string) =>
    loadTaskFolder(dir, spec, { maxLoraRank: 8, maxBottleneckSize: 16 }).softPrompt!.rows;
  assert.deepEqual(rows(a[0]!), rows(b[0]!));
  for (const dir of a) loadTaskFolder(dir, spec, { maxLoraRank: 8, maxBottleneckSize: 16 });
});
