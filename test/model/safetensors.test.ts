/** Tests for the safetensors reader/writer: round trip, exact F16/BF16 widening, structural errors. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import {
  halfToFloat,
  parseSafetensors,
  readSafetensors,
  SafetensorsError,
  serializeSafetensors,
  writeSafetensors,
} from "../../src/model/safetensors.ts";

const DIR = mkdtempSync(join(tmpdir(), "taskmux-safetensors-"));
after(() => rmSync(DIR, { recursive: true, force: true }));

interface RawEntry {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}

/** A safetensors file built by hand: u64 header length, JSON header, then the raw bytes in entry order. */
function rawSafetensors(entries: RawEntry[], headerText?: string): Uint8Array {
  let offset = 0;
  const header: Record<string, unknown> = {};
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.bytes.length] };
    offset += e.bytes.length;
  }
  const headerBytes = Buffer.from(headerText ?? JSON.stringify(header), "utf8");
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let pos = 8 + headerBytes.length;
  for (const e of entries) {
    out.set(e.bytes, pos);
    pos += e.bytes.length;
  }
  return out;
}

/** Little-endian u16 words as bytes. */
function u16Bytes(words: number[]): Uint8Array {
  const bytes = new Uint8Array(words.length * 2);
  const view = new DataView(bytes.buffer);
  words.forEach((w, i) => {
    view.setUint16(2 * i, w, true);
  });
  return bytes;
}

/** Asserts that `fn` throws a SafetensorsError for `file` whose message matches every pattern. */
function assertSafetensorsError(fn: () => unknown, file: string, patterns: RegExp[]) {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof SafetensorsError, String(error));
    assert.equal(error.file, file);
    assert.ok(error.message.startsWith(`${file}: `), error.message);
    for (const p of patterns) assert.match(error.message, p);
    return true;
  });
}

/** IEEE half bit patterns and their exact values. */
const HALVES: [bits: number, value: number][] = [
  [0x0000, 0],
  [0x8000, -0],
  [0x3c00, 1],
  [0xc000, -2],
  [0x3555, 0.333251953125],
  [0x0001, 2 ** -24], // smallest subnormal
  [0x03ff, 1023 * 2 ** -24], // largest subnormal
  [0x8001, -(2 ** -24)],
  [0x0400, 2 ** -14], // smallest normal
  [0x7bff, 65504], // largest finite
  [0x7c00, Number.POSITIVE_INFINITY],
  [0xfc00, Number.NEGATIVE_INFINITY],
  [0x7e00, Number.NaN],
  [0x7c01, Number.NaN],
];

test("halfToFloat is exact for normals, subnormals, signed zero, infinities and NaN", () => {
  for (const [bits, value] of HALVES) {
    const got = halfToFloat(bits);
    assert.ok(Object.is(got, value), `0x${bits.toString(16)}: ${got} vs ${value}`);
  }
});

test("F16 tensors widen to exactly the half values", () => {
  const file = "f16.safetensors";
  const buf = rawSafetensors([
    { name: "h", dtype: "F16", shape: [2, 7], bytes: u16Bytes(HALVES.map(([bits]) => bits)) },
  ]);
  const t = parseSafetensors(buf, file).tensors.get("h")!;
  assert.equal(t.storedDtype, "F16");
  assert.deepEqual(t.shape, [2, 7]);
  HALVES.forEach(([bits, value], i) => {
    const want = Math.fround(value);
    assert.ok(Object.is(t.data[i], want), `0x${bits.toString(16)}: ${t.data[i]} vs ${want}`);
  });
});

test("BF16 tensors widen to exactly the top 16 bits of a float32", () => {
  const cases: [bits: number, value: number][] = [
    [0x3f80, 1],
    [0xc000, -2],
    [0x8000, -0],
    [0x3eab, 0.333984375],
    [0x0001, 2 ** -133], // float32 subnormal
    [0x7f80, Number.POSITIVE_INFINITY],
    [0xff80, Number.NEGATIVE_INFINITY],
    [0x7fc0, Number.NaN],
  ];
  const buf = rawSafetensors([
    { name: "b", dtype: "BF16", shape: [cases.length], bytes: u16Bytes(cases.map(([bits]) => bits)) },
  ]);
  const t = parseSafetensors(buf, "bf16.safetensors").tensors.get("b")!;
  assert.equal(t.storedDtype, "BF16");
  cases.forEach(([bits, value], i) => {
    assert.ok(Object.is(t.data[i], value), `0x${bits.toString(16)}: ${t.data[i]} vs ${value}`);
  });
});

test("serialized F32 tensors and metadata read back unchanged, with an 8-byte aligned data section", () => {
  const tensors = {
    "b.weight": { shape: [3], data: Float32Array.from([1.5, -2.25, 3e-8]) },
    "a.weight": { shape: [2, 2], data: Float32Array.from([0, -0, 1e30, -1]) },
    scalar: { shape: [], data: Float32Array.from([7]) },
  };
  const buf = serializeSafetensors(tensors, { format: "pt" });
  const headerLength = Number(new DataView(buf.buffer).getBigUint64(0, true));
  assert.equal((8 + headerLength) % 8, 0);
  const parsed = parseSafetensors(buf, "rt.safetensors");
  assert.deepEqual(parsed.metadata, { format: "pt" });
  assert.deepEqual([...parsed.tensors.keys()].sort(), ["a.weight", "b.weight", "scalar"]);
  for (const [name, t] of Object.entries(tensors)) {
    const got = parsed.tensors.get(name)!;
    assert.deepEqual(got.shape, t.shape);
    assert.deepEqual(got.data, t.data);
    assert.equal(got.storedDtype, "F32");
  }
});

test("writeSafetensors and readSafetensors round-trip through a file and honour the `only` filter", () => {
  const file = join(DIR, "rt.safetensors");
  writeSafetensors(file, {
    keep: { shape: [2], data: Float32Array.from([1, 2]) },
    skip: { shape: [1], data: Float32Array.from([3]) },
  });
  assert.deepEqual([...readSafetensors(file).tensors.keys()].sort(), ["keep", "skip"]);
  const only = readSafetensors(file, { only: (name) => name === "keep" });
  assert.deepEqual([...only.tensors.keys()], ["keep"]);
  assert.deepEqual(only.tensors.get("keep")!.data, Float32Array.from([1, 2]));
});

test("serializeSafetensors refuses a tensor whose shape disagrees with its data", () => {
  assert.throws(
    () => serializeSafetensors({ w: { shape: [2, 2], data: new Float32Array(3) } }),
    /tensor w: shape \[2,2\] != 3 values/,
  );
});

test("zero-length tensors and adjacent byte ranges are not overlaps", () => {
  const header = JSON.stringify({
    empty: { dtype: "F32", shape: [0], data_offsets: [0, 0] },
    a: { dtype: "F32", shape: [1], data_offsets: [0, 4] },
    b: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
  });
  const buf = rawSafetensors([{ name: "pad", dtype: "F32", shape: [2], bytes: new Uint8Array(8) }], header);
  assert.deepEqual([...parseSafetensors(buf, "ok.safetensors").tensors.keys()], ["empty", "a", "b"]);
});

test("structurally broken files are SafetensorsErrors naming the file and the tensor", () => {
  const file = "broken.safetensors";
  const good = rawSafetensors([{ name: "w", dtype: "F32", shape: [4], bytes: new Uint8Array(16) }]);
  const cases: { name: string; buf: Uint8Array; patterns: RegExp[] }[] = [
    { name: "shorter than the length prefix", buf: new Uint8Array(5), patterns: [/truncated/, /no header/] },
    { name: "header cut short", buf: good.subarray(0, 20), patterns: [/truncated: header says/] },
    { name: "data cut short", buf: good.subarray(0, good.length - 1), patterns: [/truncated/, /tensor w/] },
    {
      name: "header is not JSON",
      buf: rawSafetensors([], '{"w": {dtype: F32'),
      patterns: [/header is not valid JSON/],
    },
    {
      name: "unknown dtype",
      buf: rawSafetensors([{ name: "q", dtype: "I8", shape: [4], bytes: new Uint8Array(4) }]),
      patterns: [/tensor q/, /dtype I8 is not supported/],
    },
    {
      name: "shape and byte range disagree",
      buf: rawSafetensors([{ name: "m", dtype: "F32", shape: [2, 3], bytes: new Uint8Array(16) }]),
      patterns: [/tensor m/, /shape \[2,3\] needs 24 bytes, offsets give 16/],
    },
    {
      name: "overlapping byte ranges",
      buf: rawSafetensors(
        [{ name: "pad", dtype: "F32", shape: [4], bytes: new Uint8Array(16) }],
        JSON.stringify({
          a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
          b: { dtype: "F32", shape: [2], data_offsets: [4, 12] },
        }),
      ),
      patterns: [/tensor b/, /overlap tensor a/],
    },
    {
      name: "entry without offsets",
      buf: rawSafetensors([], JSON.stringify({ z: { dtype: "F32", shape: [1] } })),
      patterns: [/tensor z/, /malformed header entry/],
    },
  ];
  for (const c of cases) {
    assertSafetensorsError(() => parseSafetensors(c.buf, file), file, c.patterns);
  }
});
