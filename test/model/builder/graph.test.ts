/** GraphBuilder.output: graph outputs are written by their producers (no Identity copy) wherever that is possible. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GraphBuilder } from "../../../src/model/builder/graph.ts";
import { DataType } from "../../../src/model/builder/onnx-proto.ts";
import { ModelSession } from "../../../src/model/session.ts";

test("an output is renamed at its producer, and uses before and after (If branches too) follow it", async () => {
  const g = new GraphBuilder("w.bin");
  g.input("x", DataType.FLOAT, [2]);
  g.input("cond", DataType.BOOL, []);
  const s = g.op1("Add", ["x", "x"]);
  const branch = (name: string, opType: string) => ({
    graph: {
      name,
      nodes: [{ opType, inputs: [s], outputs: [`${name}_out`], name: `${name}_node` }],
      initializers: [],
      inputs: [],
      outputs: [{ name: `${name}_out`, dataType: DataType.FLOAT, dims: null }],
    },
  });
  const [z] = g.op("If", ["cond"], {
    attrs: { then_branch: branch("then", "Neg"), else_branch: branch("else", "Abs") },
  });
  g.output("sum", s, DataType.FLOAT, [2]); // after the If that reads s
  const y = g.op1("Mul", [s, "x"]); // added after the rename, still naming s
  g.output("y", y, DataType.FLOAT, [2]);
  g.output("z", z!, DataType.FLOAT, [2]);
  g.output("x_again", "x", DataType.FLOAT, [2]); // a graph input: needs a copy
  g.output("sum_twice", s, DataType.FLOAT, [2]); // a second name for one value: needs a copy
  assert.equal(g.nodes.filter((n) => n.opType === "Identity").length, 2, "only x_again and sum_twice copy");
  assert.ok(!g.nodes.some((n) => n.inputs.includes(s)), "no node reads the old name");

  const dir = mkdtempSync(join(tmpdir(), "taskmux-graph-"));
  try {
    const path = join(dir, "m.onnx");
    writeFileSync(
      path,
      g.finish({ weightsPath: join(dir, "w.bin"), opsets: [{ domain: "", version: 21 }], graphName: "t" }),
    );
    const session = await ModelSession.create(path, { threads: 1 });
    const names = ["sum", "y", "z", "x_again", "sum_twice"];
    const run = async (cond: number) => {
      const out = await session.run(
        {
          x: { type: "float32", data: Float32Array.from([1, -2]), dims: [2] },
          cond: { type: "bool", data: Uint8Array.from([cond]), dims: [] },
        },
        names,
      );
      return Object.fromEntries(names.map((n) => [n, Array.from(out.float32(n))]));
    };
    assert.deepEqual(await run(1), {
      sum: [2, -4],
      y: [2, 8],
      z: [-2, 4],
      x_again: [1, -2],
      sum_twice: [2, -4],
    });
    assert.deepEqual((await run(0)).z, [2, 4], "the else branch reads the renamed value too");
    await session.dispose();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
