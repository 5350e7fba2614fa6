/** @module model/safetensors — read and write the safetensors format (F32/F16/BF16 widened to Float32Array). */
import { readFileSync, writeFileSync } from "node:fs";

export type SafetensorsDtype = "F32" | "F16" | "BF16";

/** A dense float tensor, row-major, always held as float32 in memory. */
export interface FloatTensor {
  shape: number[];
  data: Float32Array;
  /** dtype as stored on disk (tells the user what was converted). */
  storedDtype: SafetensorsDtype;
}

interface HeaderEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

const BYTES_PER_ELEMENT: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };

export class SafetensorsError extends Error {
  constructor(
    readonly file: string,
    message: string,
  ) {
    super(`${file}: ${message}`);
    this.name = "SafetensorsError";
  }
}

/** IEEE half -> float32, exact (subnormals, inf, NaN). */
export function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function decode(bytes: Uint8Array, dtype: SafetensorsDtype, count: number): Float32Array {
  const out = new Float32Array(count);
  if (dtype === "F32") {
    new Uint8Array(out.buffer).set(bytes);
    return out;
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (dtype === "BF16") {
    const u32 = new Uint32Array(out.buffer);
    for (let i = 0; i < count; i++) u32[i] = view.getUint16(2 * i, true) << 16;
    return out;
  }
  for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
  return out;
}

export interface SafetensorsFile {
  tensors: Map<string, FloatTensor>;
  metadata: Record<string, string>;
}

/**
 * Parse a safetensors file fully. Every structural problem (truncation, overlapping or
 * out-of-range offsets, unknown dtype, shape/byte mismatch) is a SafetensorsError naming the file and tensor.
 */
export function readSafetensors(
  file: string,
  options: { only?: (name: string) => boolean } = {},
): SafetensorsFile {
  const buf = readFileSync(file);
  return parseSafetensors(buf, file, options);
}

export function parseSafetensors(
  buf: Uint8Array,
  file: string,
  options: { only?: (name: string) => boolean } = {},
): SafetensorsFile {
  if (buf.byteLength < 8) throw new SafetensorsError(file, `truncated: ${buf.byteLength} bytes, no header`);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength <= 0 || 8 + headerLength > buf.byteLength) {
    throw new SafetensorsError(
      file,
      `truncated: header says ${headerLength} bytes, file has ${buf.byteLength}`,
    );
  }
  let header: Record<string, HeaderEntry | Record<string, string>>;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(8, 8 + headerLength)));
  } catch (error) {
    throw new SafetensorsError(file, `header is not valid JSON (${(error as Error).message})`);
  }
  const dataStart = 8 + headerLength;
  const dataLength = buf.byteLength - dataStart;
  const tensors = new Map<string, FloatTensor>();
  const metadata = (header.__metadata__ as Record<string, string> | undefined) ?? {};
  const ranges: { name: string; begin: number; end: number }[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const entry = raw as HeaderEntry;
    if (!(entry.dtype in BYTES_PER_ELEMENT)) {
      throw new SafetensorsError(
        file,
        `tensor ${name}: dtype ${entry.dtype} is not supported (F32, F16, BF16)`,
      );
    }
    const dtype = entry.dtype as SafetensorsDtype;
    const [begin, end] = entry.data_offsets ?? [];
    if (!Array.isArray(entry.shape) || typeof begin !== "number" || typeof end !== "number") {
      throw new SafetensorsError(file, `tensor ${name}: malformed header entry`);
    }
    const count = entry.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== count * BYTES_PER_ELEMENT[dtype]) {
      throw new SafetensorsError(
        file,
        `tensor ${name}: shape [${entry.shape}] needs ${count * BYTES_PER_ELEMENT[dtype]} bytes, offsets give ${end - begin}`,
      );
    }
    if (begin < 0 || end > dataLength) {
      throw new SafetensorsError(
        file,
        `truncated: tensor ${name} ends at byte ${end}, data section has ${dataLength}`,
      );
    }
    ranges.push({ name, begin, end });
    if (options.only && !options.only(name)) continue;
    const bytes = buf.subarray(dataStart + begin, dataStart + end);
    tensors.set(name, { shape: entry.shape, data: decode(bytes, dtype, count), storedDtype: dtype });
  }
  ranges.sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < ranges.length; i++) {
    const [prev, next] = [ranges[i - 1]!, ranges[i]!];
    if (next.begin < prev.end) {
      throw new SafetensorsError(
        file,
        `tensor ${next.name}: bytes [${next.begin}, ${next.end}) overlap tensor ${prev.name} [${prev.begin}, ${prev.end})`,
      );
    }
  }
  return { tensors, metadata };
}

/** Write float32 tensors (8-byte aligned data section, names sorted like the reference writer). */
export function serializeSafetensors(
  tensors: Record<string, { shape: number[]; data: Float32Array }>,
  metadata: Record<string, string> = {},
): Uint8Array {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const name of names) {
    const t = tensors[name]!;
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length)
      throw new Error(`tensor ${name}: shape [${t.shape}] != ${t.data.length} values`);
    header[name] = { dtype: "F32", shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let headerText = JSON.stringify(header);
  headerText += " ".repeat((8 - ((8 + Buffer.byteLength(headerText)) % 8)) % 8);
  const headerBytes = Buffer.from(headerText, "utf8");
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let pos = 8 + headerBytes.length;
  for (const name of names) {
    const t = tensors[name]!;
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), pos);
    pos += t.data.byteLength;
  }
  return out;
}

export function writeSafetensors(
  file: string,
  tensors: Record<string, { shape: number[]; data: Float32Array }>,
  metadata: Record<string, string> = {},
): void {
  writeFileSync(file, serializeSafetensors(tensors, metadata));
}
