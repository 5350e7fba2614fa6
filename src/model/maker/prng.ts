/** @module model/maker/prng — a seeded PRNG (mulberry32 + Box-Muller) so made models are byte-for-byte reproducible. */

/** Deterministic PRNG (mulberry32) with Box-Muller normals, so every test run sees the same model. */
export interface Rng {
  /** uniform in [0, 1) */
  uniform(): number;
  /** standard normal */
  normal(): number;
  /** n float32 values ~ N(mean, std^2) */
  normals(n: number, std?: number, mean?: number): Float32Array;
  /** integer in [0, n) */
  int(n: number): number;
}

export function makeRng(seed: number): Rng {
  let state = seed >>> 0;
  const uniform = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const normal = (): number => {
    const u = 1 - uniform(); // (0, 1]: log stays finite
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * uniform());
  };
  return {
    uniform,
    normal,
    normals: (n, std = 1, mean = 0) => Float32Array.from({ length: n }, () => mean + std * normal()),
    int: (n) => Math.floor(uniform() * n),
  };
}
