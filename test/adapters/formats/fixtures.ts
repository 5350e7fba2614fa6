/** @module test/adapters/formats/fixtures — a small hand-written ModelSpec, temp folders, tensors, and a rejection assert. */
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after } from "node:test";
import { TaskmuxError, type TaskmuxErrorType } from "../../../src/errors.ts";
import type { ModelSpec } from "../../../src/model/model-spec.ts";
import { type FloatTensor, serializeSafetensors } from "../../../src/model/safetensors.ts";

/** hidden 8, 2 layers, 2 query heads / 1 KV head of 4, MLP 12: q [8,8], k/v [4,8], o [8,8], gate/up [12,8], down [8,12]. */
export function smallSpec(overrides: Partial<ModelSpec> = {}): ModelSpec {
  return {
    architecture: "LlamaForCausalLM",
    hiddenSize: 8,
    numLayers: 2,
    numHeads: 2,
    numKvHeads: 1,
    headDim: 4,
    intermediateSize: 12,
    vocabSize: 32,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: null,
    maxPositionEmbeddings: 64,
    tieWordEmbeddings: true,
    qkvBias: false,
    oBias: false,
    bosTokenId: null,
    eosTokenIds: [1],
    ...overrides,
  };
}

/** A deterministic tensor: value i -> fn(i) (default: a small pseudo-random pattern with no zeros). */
export function tensor(
  shape: number[],
  fn: (i: number) => number = (i) => Math.sin(i * 1.7 + shape.length) + 0.01,
): FloatTensor {
  const count = shape.reduce((a, b) => a * b, 1);
  return { shape, data: Float32Array.from({ length: count }, (_, i) => fn(i)), storedDtype: "F32" };
}

export const tensorMap = (entries: Record<string, FloatTensor>) => new Map(Object.entries(entries));

/** A fresh temp directory, removed when the test file ends. */
export function tempDir(prefix = "taskmux-formats-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export type FileContent = Record<string, unknown> | Uint8Array | string;

/** Create `root/name/` with the given files (objects are written as JSON). */
export function writeFolder(root: string, name: string, files: Record<string, FileContent>): string {
  const dir = join(root, name);
  mkdirSync(dir, { recursive: true });
  for (const [file, content] of Object.entries(files)) {
    const data =
      content instanceof Uint8Array || typeof content === "string"
        ? content
        : JSON.stringify(content, null, 2);
    writeFileSync(join(dir, file), data);
  }
  return dir;
}

export const safetensors = (tensors: Record<string, FloatTensor>): Uint8Array =>
  serializeSafetensors(tensors);

const toHalf = (v: number): number => {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer)[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = ((u >>> 23) & 0xff) - 127 + 15;
  const mant = (u >>> 13) & 0x3ff;
  if (exp <= 0) return sign;
  if (exp >= 31) return sign | 0x7c00;
  return sign | (exp << 10) | mant;
};

/** Serialize tensors as F16 or BF16 (values rounded toward zero) — the half formats the readers must widen. */
export function halfSafetensors(tensors: Record<string, FloatTensor>, dtype: "F16" | "BF16"): Uint8Array {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const name of names) {
    const bytes = tensors[name]!.data.length * 2;
    header[name] = { dtype, shape: tensors[name]!.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const headerBytes = Buffer.from(JSON.stringify(header), "utf8");
  const out = new Uint8Array(8 + headerBytes.length + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let pos = 8 + headerBytes.length;
  for (const name of names) {
    for (const v of tensors[name]!.data) {
      const bits = dtype === "BF16" ? new Uint32Array(new Float32Array([v]).buffer)[0]! >>> 16 : toHalf(v);
      view.setUint16(pos, bits, true);
      pos += 2;
    }
  }
  return out;
}

/** Assert `fn` throws a TaskmuxError of `type` whose message matches every pattern. */
export function assertRejects(fn: () => unknown, type: TaskmuxErrorType, ...patterns: RegExp[]): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof TaskmuxError, `expected a TaskmuxError, got ${String(error)}`);
    assert.equal(error.type, type, `type of: ${error.message}`);
    for (const p of patterns) assert.match(error.message, p);
    return true;
  });
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length, "lengths differ");
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
