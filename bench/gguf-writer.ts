/**
 * @module bench/gguf-writer — a minimal GGUF v3 writer, and the conversion of a made (HF-layout, Llama, tied)
 * checkpoint to the GGUF llama.cpp reads, for the benchmark against node-llama-cpp. F32 or Q4_0 weights.
 *
 * File layout (little-endian): "GGUF" | u32 version 3 | u64 tensor count | u64 metadata count |
 * metadata (string key, u32 type, value) | tensor infos (string name, u32 n_dims, u64 ne[n_dims] fastest-first,
 * u32 ggml type, u64 offset into the data section) | zero padding to `general.alignment` | tensor data, each
 * tensor starting at a multiple of the alignment. Strings are a u64 length then UTF-8 bytes.
 *
 * Q4_0 (ggml `block_q4_0`, 18 bytes per 32 values): fp16 d then 16 bytes; following llama.cpp's
 * quantize_row_q4_0_ref: m = the block's value of largest magnitude (sign kept), d = m / -8, id = 1/d,
 * q = min(15, trunc(x * id + 8.5)); byte j holds element j in its low nibble and element j + 16 in its high one.
 *
 * llama.cpp's `llama` architecture rotates adjacent pairs (2i, 2i+1) where HF rotates halves, so q and k rows are
 * permuted per head (new row 2i + j = old row j * headDim/2 + i), as llama.cpp's convert_hf_to_gguf.py does.
 */
import { closeSync, openSync, readFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { float16Bits, float16ToFloat32 } from "../src/model/builder/quantize.ts";
import { loadCheckpoint } from "../src/model/checkpoint.ts";

export const GgufValueType = {
  UINT8: 0,
  INT8: 1,
  UINT16: 2,
  INT16: 3,
  UINT32: 4,
  INT32: 5,
  FLOAT32: 6,
  BOOL: 7,
  STRING: 8,
  ARRAY: 9,
  UINT64: 10,
  INT64: 11,
  FLOAT64: 12,
} as const;

export const GgmlType = { F32: 0, F16: 1, Q4_0: 2 } as const;
export type GgmlTypeCode = (typeof GgmlType)[keyof typeof GgmlType];

const QK4_0 = 32;
const Q4_0_BLOCK_BYTES = 2 + QK4_0 / 2;

type MetaValue =
  | { type: "string"; value: string }
  | { type: "u32"; value: number }
  | { type: "i32"; value: number }
  | { type: "f32"; value: number }
  | { type: "bool"; value: boolean }
  | { type: "strings"; value: readonly string[] }
  | { type: "i32s"; value: readonly number[] };

interface TensorEntry {
  name: string;
  /** ggml order: fastest-varying dimension first (the reverse of a row-major shape) */
  ne: number[];
  type: GgmlTypeCode;
  data: Uint8Array;
}

/** Growable little-endian byte buffer for the header. */
class ByteSink {
  private buf = new Uint8Array(1 << 20);
  private view = new DataView(this.buf.buffer);
  length = 0;

  private reserve(n: number) {
    if (this.length + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.length + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u32(v: number) {
    this.reserve(4);
    this.view.setUint32(this.length, v, true);
    this.length += 4;
  }
  i32(v: number) {
    this.reserve(4);
    this.view.setInt32(this.length, v, true);
    this.length += 4;
  }
  u64(v: number) {
    this.reserve(8);
    this.view.setBigUint64(this.length, BigInt(v), true);
    this.length += 8;
  }
  f32(v: number) {
    this.reserve(4);
    this.view.setFloat32(this.length, v, true);
    this.length += 4;
  }
  u8(v: number) {
    this.reserve(1);
    this.buf[this.length++] = v;
  }
  string(s: string) {
    const bytes = new TextEncoder().encode(s);
    this.u64(bytes.length);
    this.reserve(bytes.length);
    this.buf.set(bytes, this.length);
    this.length += bytes.length;
  }
  zeros(n: number) {
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  bytes(): Uint8Array {
    return this.buf.subarray(0, this.length);
  }
}

export class GgufWriter {
  private readonly meta: [string, MetaValue][] = [];
  private readonly tensors: TensorEntry[] = [];

  constructor(readonly alignment = 32) {
    this.add("general.alignment", { type: "u32", value: alignment });
  }

  add(key: string, value: MetaValue): this {
    this.meta.push([key, value]);
    return this;
  }

  /** A row-major tensor of the given shape (outermost first), already encoded as `type`. */
  addTensor(name: string, shape: number[], type: GgmlTypeCode, data: Uint8Array): this {
    this.tensors.push({ name, ne: [...shape].reverse(), type, data });
    return this;
  }

  addF32(name: string, shape: number[], values: Float32Array): this {
    return this.addTensor(
      name,
      shape,
      GgmlType.F32,
      new Uint8Array(values.buffer, values.byteOffset, values.byteLength),
    );
  }

  private header(): Uint8Array {
    const h = new ByteSink();
    for (const c of "GGUF") h.u8(c.charCodeAt(0));
    h.u32(3);
    h.u64(this.tensors.length);
    h.u64(this.meta.length);
    for (const [key, v] of this.meta) {
      h.string(key);
      writeMeta(h, v);
    }
    let offset = 0;
    for (const t of this.tensors) {
      h.string(t.name);
      h.u32(t.ne.length);
      for (const n of t.ne) h.u64(n);
      h.u32(t.type);
      h.u64(offset);
      offset = align(offset + t.data.byteLength, this.alignment);
    }
    h.zeros(align(h.length, this.alignment) - h.length);
    return h.bytes();
  }

  write(path: string): number {
    const fd = openSync(path, "w");
    try {
      let written = writeSync(fd, this.header());
      const pad = new Uint8Array(this.alignment);
      for (const t of this.tensors) {
        written += writeSync(fd, t.data);
        const gap = align(t.data.byteLength, this.alignment) - t.data.byteLength;
        if (gap) written += writeSync(fd, pad, 0, gap);
      }
      return written;
    } finally {
      closeSync(fd);
    }
  }
}

const align = (n: number, a: number) => Math.ceil(n / a) * a;

function writeMeta(h: ByteSink, v: MetaValue) {
  switch (v.type) {
    case "string":
      h.u32(GgufValueType.STRING);
      h.string(v.value);
      return;
    case "u32":
      h.u32(GgufValueType.UINT32);
      h.u32(v.value);
      return;
    case "i32":
      h.u32(GgufValueType.INT32);
      h.i32(v.value);
      return;
    case "f32":
      h.u32(GgufValueType.FLOAT32);
      h.f32(v.value);
      return;
    case "bool":
      h.u32(GgufValueType.BOOL);
      h.u8(v.value ? 1 : 0);
      return;
    case "strings":
      h.u32(GgufValueType.ARRAY);
      h.u32(GgufValueType.STRING);
      h.u64(v.value.length);
      for (const s of v.value) h.string(s);
      return;
    case "i32s":
      h.u32(GgufValueType.ARRAY);
      h.u32(GgufValueType.INT32);
      h.u64(v.value.length);
      for (const n of v.value) h.i32(n);
      return;
  }
}

/** ggml Q4_0 blocks of a row-major matrix whose rows are a multiple of 32 long (quantize_row_q4_0_ref). */
export function quantizeQ4_0(values: Float32Array): Uint8Array {
  if (values.length % QK4_0 !== 0) throw new Error(`Q4_0 needs a multiple of ${QK4_0} values`);
  const nb = values.length / QK4_0;
  const out = new Uint8Array(nb * Q4_0_BLOCK_BYTES);
  const view = new DataView(out.buffer);
  for (let i = 0; i < nb; i++) {
    const base = i * QK4_0;
    let amax = 0;
    let max = 0;
    for (let j = 0; j < QK4_0; j++) {
      const v = values[base + j]!;
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = Math.fround(max / -8);
    const id = d ? Math.fround(1 / d) : 0;
    const o = i * Q4_0_BLOCK_BYTES;
    view.setUint16(o, float16Bits(d), true);
    for (let j = 0; j < QK4_0 / 2; j++) {
      const x0 = Math.fround(values[base + j]! * id);
      const x1 = Math.fround(values[base + QK4_0 / 2 + j]! * id);
      const q0 = Math.min(15, Math.trunc(Math.fround(x0 + 8.5)));
      const q1 = Math.min(15, Math.trunc(Math.fround(x1 + 8.5)));
      out[o + 2 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

/** ggml dequantize_row_q4_0: (q - 8) * d. */
export function dequantizeQ4_0(blocks: Uint8Array, count: number): Float32Array {
  const out = new Float32Array(count);
  const view = new DataView(blocks.buffer, blocks.byteOffset, blocks.byteLength);
  for (let i = 0; i < count / QK4_0; i++) {
    const o = i * Q4_0_BLOCK_BYTES;
    const d = float16ToFloat32(view.getUint16(o, true));
    for (let j = 0; j < QK4_0 / 2; j++) {
      const b = blocks[o + 2 + j]!;
      out[i * QK4_0 + j] = ((b & 0x0f) - 8) * d;
      out[i * QK4_0 + j + QK4_0 / 2] = ((b >> 4) - 8) * d;
    }
  }
  return out;
}

/** HF rotate-half q/k rows -> llama.cpp's interleaved-pair rows, per head: new row 2i+j <- old row j*half+i. */
export function ropePermuteRows(w: Float32Array, numHeads: number, cols: number): Float32Array {
  const rows = w.length / cols;
  const headDim = rows / numHeads;
  const half = headDim / 2;
  const out = new Float32Array(w.length);
  for (let h = 0; h < numHeads; h++) {
    for (let i = 0; i < half; i++) {
      for (let j = 0; j < 2; j++) {
        const dst = h * headDim + 2 * i + j;
        const src = h * headDim + j * half + i;
        out.set(w.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
    }
  }
  return out;
}

interface TokenizerJson {
  added_tokens?: { id: number; content: string; special?: boolean }[];
  model: { type: string; vocab: Record<string, number>; merges: (string | [string, string])[] };
}

/** Tokens, token types and merges for `tokenizer.ggml.*` from a byte-level BPE tokenizer.json. */
export function gpt2TokenizerMetadata(modelDir: string) {
  const tok = JSON.parse(readFileSync(join(modelDir, "tokenizer.json"), "utf8")) as TokenizerJson;
  if (tok.model.type !== "BPE") throw new Error(`tokenizer model ${tok.model.type}: only byte-level BPE`);
  const entries: [string, number][] = Object.entries(tok.model.vocab);
  const special = new Set<number>();
  for (const t of tok.added_tokens ?? []) {
    entries.push([t.content, t.id]);
    if (t.special) special.add(t.id);
  }
  const size = Math.max(...entries.map(([, id]) => id)) + 1;
  const tokens: string[] = new Array(size).fill("");
  const seen = new Array<boolean>(size).fill(false);
  for (const [content, id] of entries) {
    tokens[id] = content;
    seen[id] = true;
  }
  // 1 normal, 3 control (specials), 5 unused (holes in the id range)
  const types = tokens.map((_, id) => (special.has(id) ? 3 : seen[id] ? 1 : 5));
  const merges = tok.model.merges.map((m) => (typeof m === "string" ? m : m.join(" ")));
  return { tokens, types, merges };
}

export type GgufWeights = "F32" | "Q4_0";

/**
 * Convert a HF-layout Llama checkpoint with tied embeddings (our made models) to GGUF. Q4_0 quantises every
 * 2-D weight including token_embd, which the tied head reads (like `llama-quantize --pure`): the same 4-bit
 * head our int4 graph uses. Norms stay F32. Returns the bytes written.
 */
export function convertToGguf(modelDir: string, outPath: string, weights: GgufWeights): number {
  const { spec, weights: w } = loadCheckpoint(modelDir);
  if (w.lmHead !== w.embed) throw new Error("convertToGguf: only tied-embedding checkpoints");
  if (spec.qkvBias || spec.oBias || spec.ropeScaling) throw new Error("convertToGguf: plain Llama only");
  const { tokens, types, merges } = gpt2TokenizerMetadata(modelDir);
  const eos = spec.eosTokenIds[0] ?? spec.bosTokenId ?? 0;
  const g = new GgufWriter();
  g.add("general.architecture", { type: "string", value: "llama" })
    .add("general.name", { type: "string", value: `taskmux-made-${spec.hiddenSize}x${spec.numLayers}` })
    .add("general.file_type", { type: "u32", value: weights === "F32" ? 0 : 2 }) // ALL_F32 / MOSTLY_Q4_0
    .add("llama.vocab_size", { type: "u32", value: spec.vocabSize })
    .add("llama.context_length", { type: "u32", value: spec.maxPositionEmbeddings })
    .add("llama.embedding_length", { type: "u32", value: spec.hiddenSize })
    .add("llama.block_count", { type: "u32", value: spec.numLayers })
    .add("llama.feed_forward_length", { type: "u32", value: spec.intermediateSize })
    .add("llama.rope.dimension_count", { type: "u32", value: spec.headDim })
    .add("llama.attention.head_count", { type: "u32", value: spec.numHeads })
    .add("llama.attention.head_count_kv", { type: "u32", value: spec.numKvHeads })
    .add("llama.attention.key_length", { type: "u32", value: spec.headDim })
    .add("llama.attention.value_length", { type: "u32", value: spec.headDim })
    .add("llama.attention.layer_norm_rms_epsilon", { type: "f32", value: spec.rmsNormEps })
    .add("llama.rope.freq_base", { type: "f32", value: spec.ropeTheta })
    .add("tokenizer.ggml.model", { type: "string", value: "gpt2" })
    .add("tokenizer.ggml.pre", { type: "string", value: "gpt-2" })
    .add("tokenizer.ggml.tokens", { type: "strings", value: tokens })
    .add("tokenizer.ggml.token_type", { type: "i32s", value: types })
    .add("tokenizer.ggml.merges", { type: "strings", value: merges })
    .add("tokenizer.ggml.bos_token_id", { type: "u32", value: spec.bosTokenId ?? eos })
    .add("tokenizer.ggml.eos_token_id", { type: "u32", value: eos })
    .add("tokenizer.ggml.add_bos_token", { type: "bool", value: false })
    .add("tokenizer.ggml.add_eos_token", { type: "bool", value: false });
  const d = spec.hiddenSize;
  const matrix = (name: string, rows: number, cols: number, data: Float32Array) => {
    if (weights === "F32") g.addF32(name, [rows, cols], data);
    else g.addTensor(name, [rows, cols], GgmlType.Q4_0, quantizeQ4_0(data));
  };
  matrix("token_embd.weight", spec.vocabSize, d, w.embed);
  w.layers.forEach((l, i) => {
    const b = `blk.${i}.`;
    const q = spec.numHeads * spec.headDim;
    const kv = spec.numKvHeads * spec.headDim;
    g.addF32(`${b}attn_norm.weight`, [d], l.inputNorm);
    matrix(`${b}attn_q.weight`, q, d, ropePermuteRows(l.qProj, spec.numHeads, d));
    matrix(`${b}attn_k.weight`, kv, d, ropePermuteRows(l.kProj, spec.numKvHeads, d));
    matrix(`${b}attn_v.weight`, kv, d, l.vProj);
    matrix(`${b}attn_output.weight`, d, q, l.oProj);
    g.addF32(`${b}ffn_norm.weight`, [d], l.postNorm);
    matrix(`${b}ffn_gate.weight`, spec.intermediateSize, d, l.gateProj);
    matrix(`${b}ffn_up.weight`, spec.intermediateSize, d, l.upProj);
    matrix(`${b}ffn_down.weight`, d, spec.intermediateSize, l.downProj);
  });
  g.addF32("output_norm.weight", [d], w.finalNorm);
  // No output.weight: llama.cpp falls back to token_embd for a tied head.
  return g.write(outPath);
}

/** A minimal reader of the header (tests and self-checks): metadata and tensor infos. */
export function readGgufHeader(bytes: Uint8Array): {
  version: number;
  meta: Map<string, unknown>;
  tensors: { name: string; ne: number[]; type: number; offset: number }[];
  dataStart: number;
} {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;
  const u32 = () => {
    pos += 4;
    return view.getUint32(pos - 4, true);
  };
  const u64 = () => {
    pos += 8;
    return Number(view.getBigUint64(pos - 8, true));
  };
  const str = () => {
    const n = u64();
    pos += n;
    return new TextDecoder().decode(bytes.subarray(pos - n, pos));
  };
  const value = (type: number): unknown => {
    switch (type) {
      case GgufValueType.STRING:
        return str();
      case GgufValueType.UINT32:
        return u32();
      case GgufValueType.INT32:
        pos += 4;
        return view.getInt32(pos - 4, true);
      case GgufValueType.FLOAT32:
        pos += 4;
        return view.getFloat32(pos - 4, true);
      case GgufValueType.BOOL:
        return bytes[pos++] !== 0;
      case GgufValueType.ARRAY: {
        const elem = u32();
        const n = u64();
        return Array.from({ length: n }, () => value(elem));
      }
      default:
        throw new Error(`GGUF value type ${type} not supported by this reader`);
    }
  };
  const magic = new TextDecoder().decode(bytes.subarray(0, 4));
  if (magic !== "GGUF") throw new Error("not a GGUF file");
  pos = 4;
  const version = u32();
  const nTensors = u64();
  const nMeta = u64();
  const meta = new Map<string, unknown>();
  for (let i = 0; i < nMeta; i++) {
    const key = str();
    meta.set(key, value(u32()));
  }
  const tensors = [];
  for (let i = 0; i < nTensors; i++) {
    const name = str();
    const nd = u32();
    const ne = Array.from({ length: nd }, () => u64());
    tensors.push({ name, ne, type: u32(), offset: u64() });
  }
  const alignment = (meta.get("general.alignment") as number | undefined) ?? 32;
  return { version, meta, tensors, dataStart: align(pos, alignment) };
}
