/** @module bench/models — the benchmark models (made once, seeded) and deterministic prompts shared by every bench. */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { makeModel, type PresetName } from "../src/model/maker/make-model.ts";

const BENCH_DIR = fileURLToPath(new URL(".", import.meta.url));

/** bench/.models/<preset>-seed0, made on first use. */
export function ensureBenchModel(preset: PresetName, log: (msg: string) => void): string {
  const dir = join(BENCH_DIR, ".models", `${preset}-seed0`);
  if (!existsSync(join(dir, "config.json"))) {
    log(`making the ${preset} model (deterministic, seed 0) in ${dir}`);
    makeModel({ preset, seed: 0, out: dir });
  }
  return dir;
}

/** `length` prompt ids, different per stream and request, below the special tokens (made tokenizers put them last). */
export function benchPromptIds(vocab: number, length: number, stream = 0, request = 0): number[] {
  return Array.from(
    { length },
    (_, t) => 256 + ((stream * 7919 + request * 104729 + t * 131) % (vocab - 512)),
  );
}
