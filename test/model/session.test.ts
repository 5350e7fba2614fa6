/**
 * ModelSession: the step feed record (a step's own feeds over a stable `defaults` object, read through the
 * prototype) and the spinning option, on a small graph whose answer is known.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { GraphBuilder } from "../../src/model/builder/graph.ts";
import { DataType } from "../../src/model/builder/onnx-proto.ts";
import { type FeedValue, ModelSession } from "../../src/model/session.ts";

const f32 = (values: number[], dims: number[]): FeedValue => ({
  type: "float32",
  data: Float32Array.from(values),
  dims,
});

describe("ModelSession", () => {
  let dir: string;
  let modelPath: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "taskmux-session-"));
    // y = (x + a) * b + c, every operand a graph input: [2] each.
    const g = new GraphBuilder("w.bin");
    for (const name of ["x", "a", "b", "c"]) g.input(name, DataType.FLOAT, [2]);
    const y = g.op1("Add", [g.op1("Mul", [g.op1("Add", ["x", "a"]), "b"]), "c"]);
    g.output("y", y, DataType.FLOAT, [2]);
    modelPath = join(dir, "model.onnx");
    writeFileSync(
      modelPath,
      g.finish({ weightsPath: join(dir, "w.bin"), opsets: [{ domain: "", version: 21 }], graphName: "t" }),
    );
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("defaults fill the inputs a step does not feed; a step's own feed overrides its default", async () => {
    const session = await ModelSession.create(modelPath, { threads: 1 });
    const defaults = { a: f32([0, 0], [2]), b: f32([1, 1], [2]), c: f32([0, 0], [2]) };
    const run = async (feeds: Record<string, FeedValue>) =>
      Array.from((await session.run(feeds, ["y"], defaults)).float32("y"));
    assert.deepEqual(await run({ x: f32([3, 4], [2]) }), [3, 4], "identity defaults");
    assert.deepEqual(await run({ x: f32([3, 4], [2]), b: f32([2, 10], [2]) }), [6, 40], "b overridden");
    assert.deepEqual(
      await run({ x: f32([1, 1], [2]) }),
      [1, 1],
      "the override did not stick to the defaults",
    );
    const explicit = await session.run(
      { x: f32([1, 2], [2]), a: f32([1, 1], [2]), b: f32([2, 2], [2]), c: f32([5, 5], [2]) },
      ["y"],
    );
    assert.deepEqual(Array.from(explicit.float32("y")), [9, 11], "without defaults every input is fed");
    await session.dispose();
  });

  test("a session that spins within steps computes what a blocking one does", async () => {
    const feeds = { x: f32([1, -2], [2]), a: f32([0.5, 0.5], [2]), b: f32([3, 3], [2]), c: f32([1, 1], [2]) };
    const results: number[][] = [];
    for (const spin of [false, true]) {
      const session = await ModelSession.create(modelPath, { threads: 2, spin });
      results.push(Array.from((await session.run(feeds, ["y"])).float32("y")));
      await session.dispose();
    }
    assert.deepEqual(results[0], [5.5, -3.5], "blocking threads");
    assert.deepEqual(results[1], results[0], "spinning threads");
  });

  test("dispose waits for the run in flight, and a run after it is refused without touching onnxruntime", async () => {
    const session = await ModelSession.create(modelPath, { threads: 1 });
    const feeds = { x: f32([1, 2], [2]), a: f32([0, 0], [2]), b: f32([2, 2], [2]), c: f32([1, 1], [2]) };
    const pending = session.run(feeds, ["y"]);
    await session.dispose();
    assert.deepEqual(Array.from((await pending).float32("y")), [3, 5], "the run in flight completed");
    await assert.rejects(session.run(feeds, ["y"]), /disposed/, "a run after dispose is refused");
    await session.dispose();
  });
});
