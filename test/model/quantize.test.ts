/**
 * Block quantisation for MatMulNBits (model/builder/quantize.ts): block scales, nibble order, padding, the
 * pack/unpack round trip, fp16 conversion; that onnxruntime's MatMulNBits reads our layout exactly as
 * dequantizeMatrix does; and that the GGUF Q4_0 writer follows llama.cpp's block_q4_0 layout.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import {
  dequantizeQ4_0,
  GgmlType,
  GgufWriter,
  quantizeQ4_0,
  readGgufHeader,
} from "../../bench/gguf-writer.ts";
import { GraphBuilder } from "../../src/model/builder/graph.ts";
import { DataType } from "../../src/model/builder/onnx-proto.ts";
import {
  dequantizeMatrix,
  float16Bits,
  float16ToFloat32,
  type QuantBits,
  quantizedBytes,
  quantizeMatrix,
  quantLevel,
  roundToFloat16,
  zeroPoint,
} from "../../src/model/builder/quantize.ts";
import { ModelSession } from "../../src/model/session.ts";
import { makeRng } from "../helpers/random-model.ts";

describe("quantizeMatrix", () => {
  test("int4: scale = (largest-magnitude value) / -8, element 2j in the low nibble, 2j+1 in the high nibble", () => {
    // One row, one block of 32: the largest magnitude is -1.6 (negative), so scale = 0.2 and -1.6 -> level 0.
    const w = new Float32Array(32);
    w[0] = 0.2; // 0.2 / 0.2 = 1 -> 9
    w[1] = -1.6; // -8 -> 0
    w[2] = 0.4; // 2 -> 10
    w[3] = 1.4; // 7 -> 15
    w[31] = -0.2; // -1 -> 7
    const q = quantizeMatrix(w, 1, 32, 4);
    assert.equal(q.blocksPerRow, 1);
    assert.equal(q.data.length, 16);
    assert.ok(Math.abs(q.scales[0]! - 0.2) < 1e-7, `scale ${q.scales[0]}`);
    assert.equal(q.data[0], 9 | (0 << 4));
    assert.equal(q.data[1], 10 | (15 << 4));
    assert.equal(q.data[15], 8 | (7 << 4));
    assert.equal(q.data[5], 8 | (8 << 4), "zeros sit at the zero point 8");
    assert.deepEqual(
      [0, 1, 2, 3, 31].map((c) => quantLevel(q, 0, c)),
      [9, 0, 10, 15, 7],
    );
    // A positive extreme: scale is negative and the maximum itself lands on level 0 exactly.
    const p = quantizeMatrix(
      Float32Array.from({ length: 32 }, (_, i) => (i === 4 ? 0.8 : 0.01 * i)),
      1,
      32,
      4,
    );
    assert.ok(Math.abs(p.scales[0]! + 0.1) < 1e-7);
    assert.equal(quantLevel(p, 0, 4), 0);
    assert.equal(dequantizeMatrix(p)[4], Math.fround(0.8));
  });

  test("int8: scale = max |x| / 127, levels around 128", () => {
    const w = Float32Array.from({ length: 32 }, (_, i) => (i - 16) / 16);
    const q = quantizeMatrix(w, 1, 32, 8);
    assert.equal(q.data.length, 32);
    assert.ok(Math.abs(q.scales[0]! - 1 / 127) < 1e-9);
    assert.equal(q.data[0], 1, "-1 -> 128 - 127");
    assert.equal(q.data[16], 128);
    assert.equal(quantLevel(q, 0, 31), 128 + Math.round(15 / 16 / (1 / 127)));
  });

  for (const bits of [4, 8] as QuantBits[]) {
    test(`int${bits} round trip: every element within half a step (a clamped +8 within one step), scales per block`, () => {
      const rng = makeRng(3);
      const [n, k] = [7, 80]; // 80 = 2.5 blocks: the last block is padded
      const w = rng.normals(n * k, 0.05);
      w.fill(0, 2 * k, 3 * k); // an all-zero row
      const q = quantizeMatrix(w, n, k, bits);
      assert.equal(q.blocksPerRow, 3);
      assert.equal(q.scales.length, n * 3);
      assert.equal(q.data.length, n * 3 * ((32 * bits) / 8));
      assert.equal(q.data.length + 4 * q.scales.length, quantizedBytes(n, k, bits));
      const back = dequantizeMatrix(q);
      for (let r = 0; r < n; r++) {
        for (let c = 0; c < k; c++) {
          const scale = Math.abs(q.scales[r * 3 + Math.floor(c / 32)]!);
          const err = Math.abs(back[r * k + c]! - w[r * k + c]!);
          const clamped = bits === 4 && quantLevel(q, r, c) === 15;
          assert.ok(
            err <= (clamped ? 1 : 0.5) * scale + 1e-9,
            `(${r}, ${c}): error ${err} with step ${scale}`,
          );
        }
        // The padding of the last block reads as exact zeros.
        for (let c = k; c < 96; c++) assert.equal(quantLevel(q, r, c), zeroPoint(bits));
      }
      for (let b = 0; b < 3; b++) assert.equal(q.scales[2 * 3 + b], 0, "an all-zero block has scale 0");
      assert.ok(back.subarray(2 * k, 3 * k).every((v) => v === 0));
    });
  }
});

describe("fp16", () => {
  test("float16Bits rounds to nearest even, handles subnormals, overflow, inf and NaN", () => {
    const cases: [number, number][] = [
      [1, 0x3c00],
      [-2, 0xc000],
      [0.5, 0x3800],
      [65504, 0x7bff],
      [65520, 0x7c00], // rounds up to inf
      [1e6, 0x7c00],
      [2 ** -24, 0x0001], // smallest subnormal
      [2 ** -26, 0x0000], // rounds to zero
      [1 + 2 ** -11, 0x3c00], // tie -> even
      [1 + 3 * 2 ** -11, 0x3c02], // tie -> even (up)
      [Number.POSITIVE_INFINITY, 0x7c00],
      [-0, 0x8000],
    ];
    for (const [x, bits] of cases) assert.equal(float16Bits(x), bits, `${x}`);
    assert.ok(Number.isNaN(float16ToFloat32(float16Bits(Number.NaN))));
    const rng = makeRng(5);
    const xs = rng.normals(1000, 3);
    const back = roundToFloat16(xs);
    for (let i = 0; i < xs.length; i++)
      assert.ok(Math.abs(back[i]! - xs[i]!) <= Math.abs(xs[i]!) * 2 ** -11 + 1e-7);
  });
});

describe("onnxruntime's MatMulNBits reads our layout", () => {
  const dir = mkdtempSync(join(tmpdir(), "taskmux-nbits-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  for (const bits of [4, 8] as QuantBits[]) {
    test(`int${bits}, K not a multiple of the block: accuracy_level 0 equals x times the dequantised weight`, async () => {
      const rng = makeRng(bits);
      const [m, n, k] = [3, 24, 80];
      const w = rng.normals(n * k, 0.1);
      const x = rng.normals(m * k, 1);
      const q = quantizeMatrix(w, n, k, bits);
      const g = new GraphBuilder(`nbits${bits}.bin`);
      g.input("x", DataType.FLOAT, [m, k]);
      const blob = g.externalTensor("b", DataType.UINT8, [n, q.blocksPerRow, (32 * bits) / 8], q.data);
      const scales = g.weight("s", [n * q.blocksPerRow], q.scales);
      const y = g.op1(
        "MatMulNBits",
        ["x", blob, scales],
        { K: k, N: n, bits, block_size: 32, accuracy_level: 0 },
        "com.microsoft",
      );
      g.output("y", y, DataType.FLOAT, [m, n]);
      const bytes = g.finish({
        weightsPath: join(dir, `nbits${bits}.bin`),
        opsets: [
          { domain: "", version: 21 },
          { domain: "com.microsoft", version: 1 },
        ],
        graphName: "nbits",
      });
      writeFileSync(join(dir, `nbits${bits}.onnx`), bytes);
      const session = await ModelSession.create(join(dir, `nbits${bits}.onnx`), { threads: 1 });
      const out = (await session.run({ x: { type: "float32", data: x, dims: [m, k] } }, ["y"])).float32("y");
      await session.dispose();
      const deq = dequantizeMatrix(q);
      let worst = 0;
      for (let i = 0; i < m; i++) {
        for (let j = 0; j < n; j++) {
          let acc = 0;
          for (let c = 0; c < k; c++) acc += x[i * k + c]! * deq[j * k + c]!;
          worst = Math.max(worst, Math.abs(out[i * n + j]! - acc) / (Math.abs(acc) + 1));
        }
      }
      assert.ok(worst < 1e-5, `MatMulNBits differs from the dequantised product by ${worst}`);
    });
  }
});

describe("GGUF Q4_0 (bench/gguf-writer.ts) follows llama.cpp's block_q4_0", () => {
  test("fp16 d = max / -8 first, then byte j = element j (low nibble) | element j+16 (high nibble)", () => {
    const x = new Float32Array(32);
    x[0] = 0.25; // 0.25 / -0.125 = -2 -> 6
    x[16] = 1; // -8 -> 0
    x[3] = -0.5; // 4 -> 12
    x[19] = -0.9; // 7.2 + 8.5 = 15.7 -> 15
    const block = quantizeQ4_0(x);
    assert.equal(block.length, 18);
    const d = new DataView(block.buffer).getUint16(0, true);
    assert.equal(d, float16Bits(-0.125));
    assert.equal(block[2 + 0], 6 | (0 << 4));
    assert.equal(block[2 + 3], 12 | (15 << 4));
    assert.equal(block[2 + 1], 8 | (8 << 4));
    const back = dequantizeQ4_0(block, 32);
    assert.equal(back[16], 1);
    assert.equal(back[0], 0.25);
  });

  test("the same levels as our int4 blocks (only the element order and the fp16 scale differ)", () => {
    const w = makeRng(9).normals(4 * 64, 0.05);
    const ours = quantizeMatrix(w, 4, 64, 4);
    const ggml = quantizeQ4_0(w);
    for (let b = 0; b < 8; b++) {
      for (let j = 0; j < 32; j++) {
        const byte = ggml[b * 18 + 2 + (j % 16)]!;
        const level = j < 16 ? byte & 0x0f : byte >> 4;
        assert.equal(level, quantLevel(ours, Math.floor(b / 2), (b % 2) * 32 + j), `block ${b} element ${j}`);
      }
    }
  });

  test("header round trip", () => {
    const g = new GgufWriter();
    g.add("general.architecture", { type: "string", value: "llama" })
      .add("tokenizer.ggml.tokens", { type: "strings", value: ["a", "b", "<|endoftext|>"] })
      .add("tokenizer.ggml.token_type", { type: "i32s", value: [1, 1, 3] })
      .add("llama.rope.freq_base", { type: "f32", value: 10000 });
    g.addTensor("w", [2, 32], GgmlType.Q4_0, quantizeQ4_0(new Float32Array(64).fill(0.5)));
    g.addF32("n", [3], Float32Array.of(1, 2, 3));
    const dir = mkdtempSync(join(tmpdir(), "taskmux-gguf-"));
    try {
      const file = join(dir, "t.gguf");
      const written = g.write(file);
      const bytes = new Uint8Array(readFileSync(file));
      assert.equal(bytes.length, written);
      const h = readGgufHeader(bytes);
      assert.equal(h.version, 3);
      assert.deepEqual(h.meta.get("tokenizer.ggml.tokens"), ["a", "b", "<|endoftext|>"]);
      assert.deepEqual(h.meta.get("tokenizer.ggml.token_type"), [1, 1, 3]);
      assert.deepEqual(h.tensors[0], { name: "w", ne: [32, 2], type: GgmlType.Q4_0, offset: 0 });
      assert.deepEqual(h.tensors[1], { name: "n", ne: [3], type: GgmlType.F32, offset: 64 });
      const n = new Float32Array(bytes.slice(h.dataStart + 64, h.dataStart + 76).buffer);
      assert.deepEqual([...n], [1, 2, 3]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
