/**
 * @module model/builder/quantize — weight formats the graph builder can store base weights in, and the
 * block quantisation `com.microsoft` MatMulNBits reads (ort-facts §2):
 *
 *   B      uint8 [N, ceil(K/bs), bs*bits/8]  row n = output feature n (HF Linear [out, in] order), blocks along K;
 *                                             4-bit: element 2j in the low nibble, 2j+1 in the high nibble
 *   scales float [N * ceil(K/bs)]             one per block; no zero_points input, so the zero point is 8 / 128
 *   w[n, k] ≈ (q[n, k] - zeroPoint) * scale[n, block(k)]
 *
 * Symmetric absmax quantisation per block of 32:
 *   int4: scale = m / -8 where m is the block's value of largest magnitude (sign kept, llama.cpp's Q4_0 rule),
 *         q = clamp(round(x / scale) + 8, 0, 15): m itself maps exactly to level 0 and all 16 levels are used.
 *   int8: scale = max|x| / 127, q = round(x / scale) + 128 (1..255).
 * A K that is not a multiple of the block size is padded with zeros (they dequantise to exactly 0).
 */
import type { BaseWeights, LayerWeights } from "../checkpoint.ts";

export const WEIGHT_FORMATS = ["fp32", "fp16", "int8", "int4"] as const;
export type WeightFormat = (typeof WEIGHT_FORMATS)[number];

/** Block sizes MatMulNBits takes (a power of two, at least 16); 32 is llama.cpp Q4_0's and the default. */
export const QUANT_BLOCK_SIZES = [16, 32, 64, 128, 256] as const;
export type QuantBlockSize = (typeof QUANT_BLOCK_SIZES)[number];
export const QUANT_BLOCK_SIZE: QuantBlockSize = 32;

export type QuantBits = 4 | 8;

export interface QuantizedMatrix {
  bits: QuantBits;
  /** rows (output features) */
  n: number;
  /** row length (input features) */
  k: number;
  blockSize: number;
  blocksPerRow: number;
  /** [n, blocksPerRow, blockSize * bits / 8] */
  data: Uint8Array;
  /** [n * blocksPerRow] */
  scales: Float32Array;
}

export const zeroPoint = (bits: QuantBits): number => (bits === 4 ? 8 : 128);

export function bitsOf(format: WeightFormat): QuantBits | null {
  return format === "int4" ? 4 : format === "int8" ? 8 : null;
}

/** Scale and inverse scale of one block (values x[from..to)); 0/0 for an all-zero block. */
function blockScale(w: Float32Array, from: number, to: number, bits: QuantBits): [number, number] {
  let amax = 0;
  let max = 0;
  for (let i = from; i < to; i++) {
    const v = w[i]!;
    if (Math.abs(v) > amax) {
      amax = Math.abs(v);
      max = v;
    }
  }
  const scale = amax === 0 ? 0 : Math.fround(bits === 4 ? max / -8 : amax / 127);
  return [scale, scale === 0 ? 0 : 1 / scale];
}

/** Quantise a row-major [n, k] float matrix (HF Linear layout [out, in]) for MatMulNBits(N = n, K = k). */
export function quantizeMatrix(
  w: Float32Array,
  n: number,
  k: number,
  bits: QuantBits,
  blockSize: number = QUANT_BLOCK_SIZE,
): QuantizedMatrix {
  if (w.length !== n * k) throw new Error(`quantizeMatrix: ${w.length} values for [${n}, ${k}]`);
  const blocksPerRow = Math.ceil(k / blockSize);
  const blockBytes = (blockSize * bits) / 8;
  const data = new Uint8Array(n * blocksPerRow * blockBytes);
  const scales = new Float32Array(n * blocksPerRow);
  const zp = zeroPoint(bits);
  const maxLevel = (1 << bits) - 1;
  for (let r = 0; r < n; r++) {
    for (let b = 0; b < blocksPerRow; b++) {
      const from = r * k + b * blockSize;
      const to = r * k + Math.min(k, (b + 1) * blockSize);
      const [scale, inv] = blockScale(w, from, to, bits);
      const s = r * blocksPerRow + b;
      scales[s] = scale;
      const out = s * blockBytes;
      for (let j = 0; j < blockSize; j++) {
        const x = from + j < to ? w[from + j]! : 0;
        const q = Math.min(maxLevel, Math.max(0, Math.round(x * inv) + zp));
        if (bits === 8) data[out + j] = q;
        else data[out + (j >> 1)]! |= j & 1 ? q << 4 : q;
      }
    }
  }
  return { bits, n, k, blockSize, blocksPerRow, data, scales };
}

/** The 4- or 8-bit level of element (row, col). */
export function quantLevel(q: QuantizedMatrix, row: number, col: number): number {
  const b = Math.floor(col / q.blockSize);
  const j = col % q.blockSize;
  const base = (row * q.blocksPerRow + b) * ((q.blockSize * q.bits) / 8);
  if (q.bits === 8) return q.data[base + j]!;
  const byte = q.data[base + (j >> 1)]!;
  return j & 1 ? byte >> 4 : byte & 0x0f;
}

/** Back to a row-major [n, k] float matrix: what MatMulNBits computes with. */
export function dequantizeMatrix(q: QuantizedMatrix): Float32Array {
  const out = new Float32Array(q.n * q.k);
  const zp = zeroPoint(q.bits);
  for (let r = 0; r < q.n; r++) {
    for (let c = 0; c < q.k; c++) {
      const scale = q.scales[r * q.blocksPerRow + Math.floor(c / q.blockSize)]!;
      out[r * q.k + c] = (quantLevel(q, r, c) - zp) * scale;
    }
  }
  return out;
}

/** Stored bytes of a quantised [n, k] matrix (data + fp32 scales). */
export function quantizedBytes(
  n: number,
  k: number,
  bits: QuantBits,
  blockSize: number = QUANT_BLOCK_SIZE,
): number {
  const blocks = n * Math.ceil(k / blockSize);
  return blocks * ((blockSize * bits) / 8) + blocks * 4;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** IEEE binary16 bits of a float32 value, round to nearest even (overflow -> inf, NaN kept). */
export function float16Bits(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let half = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    if (rest > mid || (rest === mid && half & 1)) half++;
    return sign | half;
  }
  let half = mant >>> 13;
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && half & 1)) {
    half++;
    if (half === 0x400) {
      half = 0;
      e++;
      if (e >= 0x1f) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | half;
}

export function float16ToFloat32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

export function toFloat16(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = float16Bits(src[i]!);
  return out;
}

/** Each element rounded to fp16 and back. */
export function roundToFloat16(src: Float32Array): Float32Array {
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = float16ToFloat32(float16Bits(src[i]!));
  return out;
}

/**
 * The weights a graph built with `format` computes with, in HF layout: what the plain reference must be given
 * to reproduce that graph up to kernel rounding. Projections (and the LM head) go through the format's round
 * trip; quantised formats keep the fp32 embedding for the Gather (a tied head becomes its own array), fp16 rounds
 * the embedding too (one fp16 table serves both). Norms and biases stay as they are.
 */
export function effectiveWeights(
  weights: BaseWeights,
  format: WeightFormat,
  blockSize: QuantBlockSize = QUANT_BLOCK_SIZE,
): BaseWeights {
  if (format === "fp32") return weights;
  const bits = bitsOf(format);
  const dims = (w: Float32Array, inDim: number): [number, number] => [w.length / inDim, inDim];
  const convert = (w: Float32Array, inDim: number): Float32Array =>
    bits === null
      ? roundToFloat16(w)
      : dequantizeMatrix(quantizeMatrix(w, ...dims(w, inDim), bits, blockSize));
  const d = weights.finalNorm.length;
  const layers = weights.layers.map(
    (l): LayerWeights => ({
      ...l,
      qProj: convert(l.qProj, d),
      kProj: convert(l.kProj, d),
      vProj: convert(l.vProj, d),
      oProj: convert(l.oProj, l.oProj.length / d),
      gateProj: convert(l.gateProj, d),
      upProj: convert(l.upProj, d),
      downProj: convert(l.downProj, l.downProj.length / d),
    }),
  );
  const lmHead = convert(weights.lmHead, d);
  const tied = weights.lmHead === weights.embed;
  const embed = bits === null ? (tied ? lmHead : roundToFloat16(weights.embed)) : weights.embed;
  return { ...weights, layers, embed, lmHead };
}
